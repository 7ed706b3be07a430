"""Data-parallel training under torchrun: 2 CPU ranks (gloo) give one process's losses, and resume
works with another number of ranks.

fp32 (precision=fp32) makes the comparison tight: the two layouts differ only in the order of sums.
The dynamics stage draws its masks per micro-batch of global rows, so one process with
grad_accum=2 and 2 ranks with grad_accum=1 see the same masks as well as the same clips.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli

SETTINGS = ["workers=0", "log_every=1", "precision=fp32"]
RTOL = 1e-5  # fp32 with another summation order: ~1e-7 measured


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m procgenie -- ARGS` with one thread per rank."""
    # `--` ends torchrun's own options: its parser would take `--run` for an abbreviation of `--run-path`.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        "procgenie",
        "--",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun procgenie {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc


def train(ranks: int, *args: str):
    return torchrun(*args, ranks=ranks) if ranks > 1 else run_cli(*args)


def log(run, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()]


def assert_same_curve(a: list[dict], b: list[dict], keys=("loss", "grad_norm")) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=RTOL), (ra["step"], k)


@pytest.fixture(scope="module")
def runs(coinrun_data, tmp_path_factory):
    """`train all` for 4 steps by one process and by two ranks, at the same global batch (tiny preset: 4)."""
    root = tmp_path_factory.mktemp("ddp")
    common = ["--data", str(coinrun_data), "--preset", "tiny", "--steps", "4", "--set", *SETTINGS]
    run_cli("train", "all", "--run", str(root / "one"), *common, "dynamics.grad_accum=2")
    torchrun("train", "all", "--run", str(root / "two"), *common)
    return root


def test_two_ranks_give_the_losses_of_one_process(runs):
    for stage in ("tokenizer", "lam", "dynamics"):
        one, two = log(runs / "one", stage), log(runs / "two", stage)
        assert [r["step"] for r in one] == [1, 2, 3, 4]
        assert_same_curve(one, two)
    assert (runs / "two" / "lam" / "action_map.json").exists()


def test_a_run_resumes_with_another_number_of_ranks(runs, tmp_path):
    """Tokenizer to step 4 with R ranks, then on to step 8 with R' ranks: the same curve for any R, R'."""
    for name in ("one", "two"):
        shutil.copytree(runs / name / "tokenizer", tmp_path / f"{name}-then-1" / "tokenizer")
    shutil.copytree(runs / "one" / "tokenizer", tmp_path / "one-then-2" / "tokenizer")
    more = ["--data", "unused", "--steps", "8", "--set", *SETTINGS]
    curves = {}
    for name, ranks in (("one-then-1", 1), ("two-then-1", 1), ("one-then-2", 2)):
        run = tmp_path / name
        more[1] = json.loads((run / "tokenizer" / "config.json").read_text())["data"]["path"]
        train(ranks, "train", "tokenizer", "--run", str(run), *more)
        curves[name] = log(run, "tokenizer")
        assert [r["step"] for r in curves[name]] == list(range(1, 9))
    assert_same_curve(curves["one-then-1"], curves["two-then-1"])
    assert_same_curve(curves["one-then-1"], curves["one-then-2"])


def test_a_batch_that_the_ranks_cannot_share_evenly_is_refused(coinrun_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "procgenie",
            "--",
            "train",
            "tokenizer",
            "--data",
            str(coinrun_data),
            "--run",
            str(tmp_path / "r"),
            "--preset",
            "tiny",
            "--set",
            "batch_size=6",
            "grad_accum=2",
            "workers=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0 and "must be divisible by 2 ranks x grad_accum 2" in proc.stderr
