"""`procgenie bench`: the real command on the tiny preset and a tiny run; SPEC's JSON schema, no timing thresholds."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from procgenie import bench as B
from procgenie import checkpoint
from procgenie.bench import load_world, table
from procgenie.errors import UserError


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_writes_the_spec_schema_with_positive_finite_figures(tiny_run, tmp_path):
    out = tmp_path / "bench.json"
    # One thread: the test suite may share the machine, and OpenMP threads that wait for each other on
    # busy cores turn milliseconds into seconds.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "procgenie",
            "bench",
            "--preset",
            "tiny",
            "--checkpoint",
            str(tiny_run),
            "--seconds",
            "0.2",  # as the tests below: each figure still times at least 3 calls (10 for play; timing.time_calls)
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert isinstance(r["device"], str) and r["device"].startswith("cpu")
    assert set(r["train_frames_per_s"]) == {"tokenizer", "lam", "dynamics"}
    assert all(_positive(v) for v in r["train_frames_per_s"].values())
    for key in ("matmul_peak_share", "play_fps", "play_latency_ms_p50", "play_latency_ms_p95"):
        assert _positive(r[key]), key
    assert r["play_latency_ms_p50"] <= r["play_latency_ms_p95"]
    assert r["play_maskgit_steps"] == 2  # the tiny dynamics config's default
    assert _positive(r["generate_fps"]) and r["generate_maskgit_steps"] == 2  # generate, timed beside play
    assert "frames/s" in proc.stdout and "dynamics" in proc.stdout and "timing" in proc.stderr
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_without_a_model_play_is_reported_as_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "PRETRAINED", tmp_path / "no-bundle")  # an install without the bundle
    wm, note = load_world(None, torch.device("cpu"))
    assert wm is None and note.startswith("not measured")
    r = {
        "device": "cpu: x",
        "torch": "2",
        "precision": "bf16",
        "preset": "tiny",
        "matmul_flops_per_s": 1e9,
        "matmul_size": 2048,
        "train": {
            "dynamics": {
                "frames_per_s": 1.0,
                "step_ms": 1.0,
                "batch_size": 4,
                "seq_len": 4,
                "flops_per_step": 1e6,
                "flops_per_s": 1e9,
            }
        },
        "train_peak_share": {"dynamics": 1.0},
        "play_fps": None,
        "play_note": note,
    }
    assert note in table(r)


def test_fp32_precision_times_every_part_without_bf16(tiny_run, monkeypatch):
    seen = {}
    real_load = B.load_world

    def load(checkpoint, device, precision="auto"):
        seen["play"] = precision
        return real_load(checkpoint, device, precision)

    monkeypatch.setattr(B, "load_world", load)
    r = B.bench(str(tiny_run), seconds=0.2, preset="tiny", precision="fp32")
    assert r["precision"] == "fp32" and seen["play"] == "fp32"
    assert all(_positive(v) for v in r["train_frames_per_s"].values())


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="precision must be one of auto, bf16, fp32"):
        B.bench(precision="fp16")


def test_set_overrides_change_the_timed_training_and_are_recorded(tiny_run):
    r = B.bench(str(tiny_run), seconds=0.2, preset="tiny", overrides=["batch_size=2", "dynamics.seq_len=3"])
    assert r["overrides"] == ["batch_size=2", "dynamics.seq_len=3"]
    assert {s: v["batch_size"] for s, v in r["train"].items()} == {"tokenizer": 2, "lam": 2, "dynamics": 2}
    assert r["train"]["dynamics"]["seq_len"] == 3 and r["train"]["lam"]["seq_len"] == 4
    assert "batch_size=2" in table(r)
    with pytest.raises(UserError, match="unknown --set key 'widht'"):
        B.bench(seconds=0.2, preset="tiny", overrides=["widht=8"])


@pytest.mark.parametrize("stage", ["tokenizer", "dynamics"])
def test_flops_are_the_models_whatever_the_batch_and_without_checkpoint_recompute(stage):
    """The FLOP count is taken on a slice and scaled, and activation checkpointing's second forward is not in it."""
    from procgenie import config as C
    from procgenie.overrides import apply_overrides

    counts = {}
    for batch, ckpt in ((2, False), (4, False), (4, True)):
        stages = C.preset("tiny")
        apply_overrides(stages, [f"batch_size={batch}", f"act_ckpt={ckpt}"], C.STAGES)
        counts[batch, ckpt] = B.time_training(stage, stages, torch.device("cpu"), 0.01)["flops_per_step"]
    assert counts[4, False] == 2 * counts[2, False] > 0
    assert counts[4, True] == counts[4, False]
