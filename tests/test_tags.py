"""The registry of metric families: consistent with itself, with the tag builders and with the docs' tag table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from param_monitor import tags

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_is_well_formed() -> None:
    names = [f.name for f in tags.FAMILIES]
    assert len(names) == len(set(names))
    for fam in tags.FAMILIES:
        assert fam.key in tags.KEYS and fam.reduction in tags.REDUCTIONS and fam.chart in tags.CHARTS
        assert fam.scale in ("log", "linear") and fam.meaning


def test_registry_agrees_with_the_tag_builders() -> None:
    assert tags.family(tags.GRAD_NORM).tag("a.weight") == tags.grad_norm("a.weight")
    assert tags.family(tags.SHARED_GRAD_SHARE).tag("a.weight", "b") == tags.shared_grad_share("a.weight", "b")
    assert tags.family_of(tags.grad_norm_total(1)).name == tags.GRAD_NORM_TOTAL
    assert tags.family_of("param_monitor/parameters") is None
    gradient = {f.name for f in tags.FAMILIES if f.gradient}
    assert all(any(name.startswith(p) for p in tags.GRADIENT_PREFIXES) for name in gradient - {tags.DEAD_UNITS})


def test_register_refuses_duplicates_and_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="already registered"):
        tags.register(tags.family(tags.GRAD_NORM))
    with pytest.raises(ValueError, match="not one of"):
        tags.register(tags.MetricFamily("x_test", "name", "sum", "heatmap", "log", None, "x"))
    with pytest.raises(KeyError, match="registered:"):
        tags.family("no_such_family")


def _documented_families() -> set[str]:
    """Family names in the first cell of the tag tables of the README and docs/ (`name/...` or `name`)."""
    found: set[str] = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in page.read_text(encoding="utf-8").splitlines():
            match = re.match(r"^\| `([a-z_]+)[/`]", line)
            if match:
                found.add(match.group(1))
    return found


def test_the_docs_tag_table_lists_every_family() -> None:
    missing = {f.name for f in tags.FAMILIES} - _documented_families()
    assert not missing, f"families missing from the docs' tag table: {sorted(missing)}"
