"""The code passes the project's formatter and lint (ruff, configured in pyproject.toml; a test extra), its
modules stay small, and Procgen's action count lives in one place; CI keeps it so."""

import re
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


def test_no_module_runs_much_over_300_lines():
    """Small files that show the architecture (docs/architecture.md): a module past this wants splitting."""
    root = ROOT / "procgenie"
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 310}
    assert not long, f"modules over 310 lines: {long}"


def test_the_action_count_is_written_only_in_the_vocabulary_module():
    """Procgen's 15 actions are `vocab.NUM_ACTIONS` everywhere else (a literal 15 beside 'action' is a leak)."""
    root = ROOT / "procgenie"
    leaks = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p.name != "vocab.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\b15\b", line) and "action" in line.lower()
    ]
    assert not leaks, leaks
