"""Every code block of the README and of docs/ runs.

Python blocks are executed as they are (each one self-contained, in a fresh interpreter, from the
repository root). Shell blocks are checked line by line, without training anything: a
``python -m experiments.X`` / ``python experiments/X.py`` line runs with its arguments and
``--print_config`` (LightningCLI parses and validates them, configs included) or ``--help`` (the
other scripts); ``make T`` needs a target T in the Makefile; a ``tensorboard`` line needs the venv's
TensorBoard with the flags given.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
LIGHTNING_CLI = {"experiments.shared_mlp", "experiments/shared_mlp.py", "experiments.tied_lm", "experiments/tied_lm.py"}


def _blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            if match.group(1) == language:
                found.append((f"{page.relative_to(ROOT)}#{i}", match.group(2)))
    return found


def _shell_lines() -> list[tuple[str, str]]:
    lines = []
    for where, body in _blocks("bash"):
        for line in body.splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                lines.append((where, command))
    return lines


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), _blocks("python"), ids=[w for w, _ in _blocks("python")])
def test_python_block_runs(where: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(f"import os\nos.chdir({str(tmp_path)!r})\n" + code, encoding="utf-8")
    result = _run([sys.executable, str(script)])
    assert result.returncode == 0, f"{where} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def _checked_command(command: str) -> list[str] | None:
    """The argv that checks ``command`` without doing its work (None: a make target, checked apart)."""
    argv = shlex.split(command)
    if argv[0] == "make":
        return None
    if argv[0] in ("python", "python3", ".venv/bin/python"):
        target = argv[2] if argv[1] == "-m" else argv[1]
        probe = "--print_config" if target in LIGHTNING_CLI and "--print_config" not in argv else "--help"
        return [sys.executable, *argv[1:], probe]
    if argv[0].endswith("tensorboard"):
        return [str(Path(sys.executable).with_name("tensorboard")), "--helpfull"]
    raise AssertionError(f"no rule to check the documented command {command!r}: add one to tests/test_docs.py")


@pytest.mark.slow
@pytest.mark.parametrize(("where", "command"), _shell_lines(), ids=[f"{w}:{c[:40]}" for w, c in _shell_lines()])
def test_shell_line_runs(where: str, command: str) -> None:
    argv = _checked_command(command)
    if argv is None:
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert shlex.split(command)[1] in targets, f"{where}: no make target in {command!r}"
        return
    result = _run(argv)
    assert result.returncode == 0, f"{where}: {command!r} failed:\n{result.stderr[-3000:]}"
