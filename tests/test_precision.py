"""`--precision auto|bf16|fp32`: auto picks bf16 only where it is faster, and every command records what it used."""

import json

import pytest
import torch
from conftest import run_cli, sh

from procgenie import checkpoint as ckpt
from procgenie import precision as P
from procgenie.cli import build_parser
from procgenie.errors import UserError
from procgenie.world import WorldModel


def never(dtype):
    raise AssertionError("no measurement is needed where the CPU has no bf16 instructions")


@pytest.fixture
def x86(monkeypatch):
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")


def test_an_x86_cpu_without_bf16_instructions_gets_fp32_without_measuring(x86):
    faster, why = P.cpu_prefers_bf16({"sse4_2", "avx2", "fma"}, probe=never)
    assert not faster and "avx512_bf16" in why


@pytest.mark.parametrize("bf16_s, fp32_s, want", [(0.5, 0.004, False), (0.004, 0.004, False), (0.002, 0.005, True)])
def test_where_the_flag_exists_the_measurement_decides(x86, bf16_s, fp32_s, want):
    times = {torch.bfloat16: bf16_s, torch.float32: fp32_s}
    faster, why = P.cpu_prefers_bf16({"avx2", "avx512_bf16"}, probe=times.__getitem__)
    assert faster is want and "measured" in why


def test_a_busy_moment_during_one_timing_does_not_decide(x86):
    """bf16 is twice as fast, but another process takes the CPU while the first two bf16 products run."""
    calls = []

    def busy_then_idle(dtype):
        calls.append(dtype)
        fast = 0.001 if dtype == torch.bfloat16 else 0.002
        return fast * (10 if calls.count(torch.bfloat16) <= 2 and dtype == torch.bfloat16 else 1)

    faster, why = P.cpu_prefers_bf16({"avx2", "avx512_bf16"}, probe=busy_then_idle)
    assert faster and "bf16 1.00 ms, fp32 2.00 ms" in why
    assert calls[:4] == [torch.bfloat16, torch.float32] * 2  # the two alternate


def test_auto_resolves_once_per_device_from_the_check(monkeypatch):
    calls = []
    monkeypatch.setattr(P, "_decided", {})
    monkeypatch.setattr(P, "cpu_prefers_bf16", lambda: calls.append(1) or (False, "probe: bf16 slower"))
    cpu = torch.device("cpu")
    assert P.resolve("auto", cpu) == "fp32" and P.resolve("auto", cpu) == "fp32" and len(calls) == 1
    assert P.resolve("bf16", cpu) == "bf16" and P.resolve("fp32", cpu) == "fp32"
    monkeypatch.setattr(P, "_decided", {})
    monkeypatch.setattr(P, "cpu_prefers_bf16", lambda: (True, "probe: bf16 faster"))
    assert P.resolve("auto", cpu) == "bf16"
    with pytest.raises(UserError, match="precision must be one of auto, bf16, fp32"):
        P.resolve("fp16", cpu)


def test_the_world_model_computes_in_what_it_was_given(tiny_run, monkeypatch):
    monkeypatch.setattr(P, "_decided", {"cpu": "fp32"})  # auto, as on a CPU where bf16 is slower
    assert WorldModel.from_pretrained(tiny_run, device="cpu").precision == "fp32"
    assert WorldModel.from_pretrained(tiny_run, device="cpu", precision="bf16").precision == "bf16"


def test_old_runs_bf16_setting_reads_as_precision():
    d = {"stage": "lam", "model": {}, "train": {"bf16": True}}
    assert ckpt.C.from_dict(d).train.precision == "auto"
    d["train"] = {"bf16": False}
    assert ckpt.C.from_dict(d).train.precision == "fp32"


@pytest.mark.parametrize(
    "command",
    [
        ["train", "all", "--data", "D", "--run", "R"],
        ["eval", "--data", "D", "--out", "O"],
        ["play"],
        ["dream", "--out", "x.gif"],
        ["bench"],
    ],
)
def test_every_computing_command_takes_the_setting(command):
    parser = build_parser()
    assert parser.parse_args([*command, "--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--precision", "fp16"])


@pytest.mark.slow
def test_train_eval_and_dream_record_the_precision(coinrun_data, tiny_run, tmp_path):
    run, report, gif = tmp_path / "run", tmp_path / "report", tmp_path / "d.gif"
    out = run_cli(
        *sh(
            f"train tokenizer --data {coinrun_data} --run {run} "
            "--preset tiny --steps 2 --precision fp32 --set workers=0"
        ),
    ).stdout
    saved = json.loads((run / "tokenizer" / "config.json").read_text())  # every stage saves it the same way
    assert saved["train"]["precision"] == "fp32" and saved["precision_used"] == "fp32" and "fp32" in out
    run_cli(
        *sh(f"eval --checkpoint {tiny_run} --data {coinrun_data} --out {report} --episodes 2 --precision fp32"),
        *sh("--long-play 50"),  # play.scroll's long play: 50 frames, not 500 (its figure is not asserted here)
    )
    assert json.loads((report / "metrics.json").read_text())["run"]["precision"] == "fp32"
    said = run_cli(*sh(f"dream --checkpoint {tiny_run} --out {gif} --steps 2 --precision bf16")).stdout
    assert "bf16" in said and gif.stat().st_size > 0
