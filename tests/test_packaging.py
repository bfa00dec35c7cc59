"""pyproject.toml declares ranges; constraints.txt pins this machine's builds; the ranges admit the pins."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, list[Requirement]]:
    """Every requirement of the project, core and extras, by ``core``/extra name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def pins() -> dict[str, str]:
    """``{package: version}`` of constraints.txt's ``name==version`` lines."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line).groups()
            out[canonicalize_name(name)] = version
    return out


def test_declared_ranges_admit_the_pinned_builds() -> None:
    pinned = pins()
    assert {"torch", "torchvision"} <= set(pinned)
    checked = set()
    for group, reqs in declared().items():
        for req in reqs:
            name = canonicalize_name(req.name)
            if name in pinned:
                assert req.specifier.contains(pinned[name], prereleases=True), (group, str(req), pinned[name])
                checked.add(name)
    assert checked == set(pinned)  # every pin is of something the project declares


def test_ranges_not_pins_and_experiment_packages_are_extras() -> None:
    groups = declared()
    core = {canonicalize_name(r.name): r for r in groups["core"]}
    assert {"torch", "lightning", "tensorboard"} <= set(core)
    assert not {"torchvision", "matplotlib"} & set(core)  # the experiment's and the report's, as extras
    assert "torchvision" in {canonicalize_name(r.name) for r in groups["experiment"]}
    assert "matplotlib" in {canonicalize_name(r.name) for r in groups["report"]}
    for group, reqs in groups.items():
        for req in reqs:  # a pin would replace (or fail against) a user's own build
            assert not any(s.operator in ("==", "===") for s in req.specifier), (group, str(req))
            assert any(s.operator in (">=", ">") for s in req.specifier), (group, str(req))


def test_pins_are_this_machines_builds_and_the_makefile_uses_them() -> None:
    for name, version in pins().items():
        assert metadata.version(name).split("+")[0] == version.split("+")[0], name
    install = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line and "-e" in line]
    assert install and all("-c constraints.txt" in line for line in install)
