"""The README's commands work when pasted into a clone: every ``sh`` block marked
``<!-- runnable -->`` (those that need no broker) runs, line by line, and succeeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKED = re.compile(r"<!-- runnable -->\n```sh\n(.*?)```", re.S)


def runnable_lines() -> list[str]:
    blocks = MARKED.findall((ROOT / "README.md").read_text())
    assert blocks, "the README marks no block runnable"
    return [
        line.split("  #")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


@pytest.mark.parametrize("line", runnable_lines())
def test_readme_command_runs_in_a_clone(line: str, tmp_path: Path) -> None:
    """Run from a folder that looks like the clone's root (its files linked in), so what the
    command writes (plots, state) lands in a temporary folder, not in the working tree."""
    for name in ("forecaster", "configs", "simulators"):
        (tmp_path / name).symlink_to(ROOT / name)
    command = line.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr


def test_the_readme_stays_short_and_every_module_small() -> None:
    """Issue 21's bounds: a README a user reads in five minutes (the rest is docs/), and modules
    a reviewer reads in one sitting."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    long = {
        str(path.relative_to(ROOT)): length
        for folder in ("forecaster", "simulators")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (length := len(path.read_text().splitlines())) > 450
    }
    assert not long, f"modules over 450 lines: {long}"
