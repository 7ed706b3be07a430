"""The training loop and the train command: end to end, resume, and refusing to mix settings."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, sh
from safetensors.torch import load_file

from procgenie import config as C
from procgenie.data.loader import ClipSampler
from procgenie.data.store import Dataset
from procgenie.nn.tokenizer import Tokenizer
from procgenie.train import fit, lr_at


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    t = C.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_frac=0.1)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(55, t) == pytest.approx(0.55, abs=0.01) and lr_at(100, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 100))


def test_train_tokenizer_through_the_command_line(coinrun_data, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        *sh(f"train tokenizer --data {coinrun_data} --run {run} --preset tiny --steps 12 --set workers=0 log_every=4"),
    )
    stage = run / "tokenizer"
    cfg = json.loads((stage / "config.json").read_text())
    assert cfg["stage"] == "tokenizer" and cfg["train"]["steps"] == 12 and cfg["preset"] == "tiny"
    assert cfg["data"]["env"] == "coinrun"
    log = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12] and all(r["psnr"] > 0 for r in log)
    # At each checkpoint (the tiny preset's ckpt_every is 10, and the last step), the loss on val-split clips.
    val = [json.loads(line) for line in (stage / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [10, 12] and all(0 < r["val_loss"] < 10 for r in val)
    assert val[0]["val_loss"] != val[1]["val_loss"]  # measured, not copied
    assert list((stage / "tb").iterdir())  # TensorBoard event files
    weights = load_file(str(stage / "model.safetensors"))
    model = Tokenizer(C.from_dict(cfg).model)
    assert set(weights) == set(model.state_dict())
    assert "tokenizer" in proc.stdout
    # Rerunning the same command: nothing to do. Asking for more steps: it continues.
    assert (
        "already trained"
        in run_cli(
            *sh(f"train tokenizer --data {coinrun_data} --run {run} --steps 12 --set workers=0 log_every=4"),
        ).stdout
    )
    run_cli(
        *sh(f"train tokenizer --data {coinrun_data} --run {run} --steps 14 --set workers=0 log_every=4"),
    )
    assert json.loads((stage / "log.jsonl").read_text().splitlines()[-1])["step"] == 14
    # Other model settings on the same run folder: refused, with the difference named.
    bad = run_cli(*sh(f"train tokenizer --data {coinrun_data} --run {run} --set width=64"), check=False)
    assert bad.returncode == 2 and "width 32 (now 64)" in bad.stderr


class Interrupting(ClipSampler):
    """A sampler whose batch at `stop_at` raises, as if the process died there."""

    stop_at = None

    def batch(self, step):
        if step == self.stop_at:
            raise KeyboardInterrupt
        return super().batch(step)


def _train(data, stage_dir, stop_at=None):
    sc = C.preset("tiny")["tokenizer"]
    sc.train = C.TrainConfig(steps=9, batch_size=4, lr=2e-3, warmup=2, log_every=3, ckpt_every=3, workers=0)
    torch.manual_seed(0)
    model = Tokenizer(sc.model)
    sampler = Interrupting(Dataset(data), "train", sc.model.seq_len, 4, seed=0)
    sampler.stop_at = stop_at
    stage_dir.mkdir(parents=True, exist_ok=True)
    fit(model, sc, sampler, stage_dir, torch.device("cpu"), quiet=True)
    return model


@pytest.mark.parametrize("stop_at", [4, 7])
def test_resume_continues_exactly_where_an_unbroken_run_would_be(coinrun_data, tmp_path, stop_at):
    unbroken = _train(coinrun_data, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _train(coinrun_data, tmp_path / "b", stop_at=stop_at)
    resumed = _train(coinrun_data, tmp_path / "b")  # same call again: resumes
    for (k, v), w in zip(unbroken.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_a_resumed_run_computes_in_the_precision_it_started_in(coinrun_data, tmp_path, monkeypatch):
    """`auto` is timed per process; a rerun whose timing came out the other way keeps the run's precision."""
    import procgenie.train as T

    monkeypatch.setattr(T, "resolve", lambda precision, device: "bf16")
    with pytest.raises(KeyboardInterrupt):
        _train(coinrun_data, tmp_path / "b", stop_at=4)
    monkeypatch.setattr(T, "resolve", lambda precision, device: "fp32")
    used = []
    monkeypatch.setattr(T, "autocast", lambda device, precision: used.append(precision) or T.nullcontext())
    _train(coinrun_data, tmp_path / "b")
    assert used and set(used) == {"bf16"}
    assert T.ckpt.state_meta(tmp_path / "b" / "state.safetensors")["precision"] == "bf16"
    _train(coinrun_data, tmp_path / "c")  # a fresh run takes what auto resolves to
    assert T.ckpt.state_meta(tmp_path / "c" / "state.safetensors")["precision"] == "fp32"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_on_a_cpu_freed_large_blocks_are_reused_without_page_faults():
    """A 64 MB tensor made, freed and made again: page-faulted anew each time by default, not after the setting."""
    code = """
import resource, sys, torch
import procgenie.train  # as a training process has it (with runtime alone the heap fell back to mmap)
from procgenie.runtime import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.ones(16 << 20)                                   # 64 MB of float32, written and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
took = keep_freed_memory()
faults()
print(default, faults(), took)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    default, kept, took = out.split()
    assert took == "True"
    assert int(default) > 3 * 10_000  # 16,384 pages of 4 KB per tensor
    assert int(kept) < 1_000
