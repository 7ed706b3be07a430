"""The README's two commands: the test command is what CI runs, and the main command's procgenie
steps run end to end (with the tiny preset and a smaller dataset, as the issue asks)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import serve_play_page

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    main, tests = readme_commands()[:2]
    for cmd in (main, tests):
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ")
    assert tests.endswith("pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests  # CI runs exactly the README's test command


@pytest.mark.slow
def test_readme_main_command_runs_end_to_end(tmp_path):
    main = readme_commands()[0]
    steps = [s.strip() for s in main.split("&&") if s.strip().startswith("procgenie ")]
    assert [s.split()[1] for s in steps] == ["collect", "train", "eval", "eval", "play"]
    small = {"--episodes": "48", "--max-steps": "60", "--preset": "tiny", "--steps": "30"}
    for step in steps[:-1]:
        args = shlex.split(step)[1:]
        for i, a in enumerate(args[:-1]):
            if a in small:
                args[i + 1] = small[a]
        if args[0] == "collect":
            args += ["--num-levels", "10"]  # a few levels, so the test split is surely there
        if args[0] == "train":
            args += ["--set", "workers=0"]
        if args[0] == "eval":
            # 2 clips (and play.scroll on their 2 levels), and play.scroll's long play for 50 frames, not 500: every
            # part of the eval runs, on the bundled model too, and the test reads only that each writes its report
            args += ["--episodes", "2", "--long-play", "50"]
        subprocess.run(
            [sys.executable, "-m", "procgenie", *args], cwd=tmp_path, check=True, capture_output=True, timeout=900
        )
    for report in ("reports/quick", "reports/bundled"):
        assert (tmp_path / report / "metrics.json").exists() and (tmp_path / report / "report.html").exists()
    # The last step serves the bundled world: start it, fetch the page, stop it.
    serve_play_page(shlex.split(steps[-1])[1:], tmp_path)
