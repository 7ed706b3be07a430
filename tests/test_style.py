"""The code passes the project's formatter and lint (ruff, configured in pyproject.toml; a test extra), so CI
keeps it so."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "procgenie", "tests", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_changes_nothing():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "procgenie", "tests", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, "run `ruff format procgenie tests scripts`:\n" + proc.stdout + proc.stderr
