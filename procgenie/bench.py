"""`procgenie bench`: how fast this machine trains and plays, and how much of its matmul peak training uses.

- Training frames/s per stage: the real training step (`train.train_step`: autocast, backward,
  clipping, AdamW) of freshly built models of a preset, on synthetic uint8 frames (no dataset needed; the
  loader is measured separately, see `data.loader.loader_frames_per_s`). A frame is one frame of a training clip:
  a step trains batch_size x seq_len of them. The dynamics step includes what `procgenie train
  dynamics` does each step too: encoding the frames with the frozen tokenizer and LAM (fresh ones
  here, built from the same preset).
- matmul_peak_share: a stage's achieved FLOP/s (its step's FLOPs, counted by torch's FlopCounterMode
  on one step: matmuls, convolutions, attention, forward and backward, frozen encoders included; not
  the forward that activation checkpointing recomputes)
  over the FLOP/s of a large square matrix product timed in the same run, in the same precision.
  The SPEC's top-level figure is the dynamics stage's; every stage's share is reported too.
- Play: frames/s and per-frame latency of `session.Session.step` (batch 1, one frame per call, MaskGIT
  decoding and the tokenizer's decoder) at play's MaskGIT steps (`--maskgit-steps`, else play's
  default), timed once the key/value caches are full, as in long play.

Every figure is a total over `seconds` of repeated calls divided by their count (a mean, not a best
case): on a shared machine both training and the matmul peak see the same neighbours.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from procgenie import config as C
from procgenie.atomic import write_json_atomic
from procgenie.errors import UserError
from procgenie.models import Links, build, pick_device
from procgenie.overrides import apply_overrides
from procgenie.precision import check as check_precision
from procgenie.precision import resolve
from procgenie.runtime import set_cpu_threads, speed_settings
from procgenie.timing import device_name, matmul_flops_per_s, time_calls
from procgenie.train import make_optimizer, set_act_ckpt, train_step
from procgenie.vocab import NUM_ACTIONS, RIGHT, start_frames


def _say(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- training ------------------------------------------------------------------------------------


def _models(stage: str, stages: dict[str, C.StageConfig], device) -> torch.nn.Module:
    """A fresh model of `stage`; the dynamics model gets a fresh frozen tokenizer and LAM, as in training."""
    if stage != "dynamics":
        return build(stages[stage]).to(device)
    tok, lam = build(stages["tokenizer"]).to(device), build(stages["lam"]).to(device)
    model = build(stages["dynamics"], Links.of(tok, lam)).to(device)
    model.attach(tok, lam)
    return model


def training_setup(stage: str, stages: dict[str, C.StageConfig], device) -> tuple:
    """(model, optimizer, batch) for timing `stage`'s training step: a fresh model (activation checkpointing
    off) and synthetic uint8 frames at its preset's batch."""
    sc, t = stages[stage], stages[stage].train
    size = stages["tokenizer"].model.image_size
    torch.manual_seed(0)
    model = _models(stage, stages, device).train()
    opt = make_optimizer(model, t, device)
    B, T = t.batch_size, sc.model.seq_len
    gen = torch.Generator().manual_seed(0)
    batch = {
        "frames": torch.randint(0, 256, (B, T, size, size, 3), dtype=torch.uint8, generator=gen),  # (B,T,H,W,C)
        "actions": torch.randint(0, NUM_ACTIONS, (B, T - 1), generator=gen),
    }  # (B, T-1)
    if device.type == "cuda":  # as the training loader hands them over
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return model, opt, batch


def prepare(preset: str, overrides: list[str] | None = None, precision: str | None = None) -> tuple:
    """(stages, device) to time: the preset with `train --set` overrides and precision ('auto'/'bf16'/'fp32',
    None: the preset's), resolved for the device training would pick, with training's thread and kernel settings."""
    stages = C.preset(preset)
    apply_overrides(stages, overrides or [], C.STAGES)
    device = pick_device()
    if device.type == "cpu":
        set_cpu_threads()  # first: auto's measurement runs with training's threads
    for sc in stages.values():
        sc.train.precision = resolve(sc.train.precision if precision is None else precision, device)
    speed_settings(device, deterministic=False)
    return stages, device


def time_training(stage: str, stages: dict[str, C.StageConfig], device, seconds: float) -> dict:
    """Frames/s, FLOPs per step and FLOP/s of `stage`'s training step at its preset's batch."""
    t = stages[stage].train
    model, opt, batch = training_setup(stage, stages, device)
    B, T = batch["frames"].shape[:2]
    # The model's FLOPs, counted on one clip per micro-batch and scaled (they grow linearly with the batch),
    # without activation checkpointing (its recomputed forward is extra work, not the model's).
    few = {k: v[: t.grad_accum] for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        train_step(model, model, opt, few, t, device)
    flops = counter.get_total_flops() * B // t.grad_accum
    set_act_ckpt(model, t.act_ckpt)
    net = model
    if t.compile:
        _say(f"compiling the {stage} model (minutes on a CPU) ...")
        net = torch.compile(model)
    train_step(net, model, opt, batch, t, device)
    times = time_calls(lambda: train_step(net, model, opt, batch, t, device), device, seconds, 3)
    step_s = sum(times) / len(times)
    return {
        "frames_per_s": B * T / step_s,
        "step_ms": 1000 * step_s,
        "flops_per_step": flops,
        "flops_per_s": flops / step_s,
        "batch_size": B,
        "seq_len": T,
    }


# -- play ----------------------------------------------------------------------------------------


def load_world(checkpoint: str | None, device, precision: str = "auto"):
    """The world model to time play on, or (None, why) when there is none to time."""
    from procgenie.world import WorldModel

    try:
        return WorldModel.from_pretrained(checkpoint, device=device, precision=precision), None
    except UserError as e:
        if checkpoint is not None:
            raise
        return None, f"not measured: {e}"


def time_play(wm, seconds: float, maskgit_steps: int | None, what: str = "play") -> dict:
    """Frames/s and latency percentiles of Session.step, batch 1, once the caches are full: of the model play drives,
    or (what='generate') of `WorldModel.generate`'s. In a Procgen world, from a real level's first frames with right
    held: a warp model encodes the moved last frame only when the camera moves, so a still screen would time less
    work than a player gets."""
    from procgenie.dream import context_length
    from procgenie.session import Session

    steps = wm.play_steps(maskgit_steps) if what == "play" else maskgit_steps or wm.dynamics.cfg.maskgit_steps
    wm.fast_weights()  # as play runs it
    size, C = wm.image_size, context_length(wm)
    context = np.full((1, C, size, size, 3), 128, np.uint8)  # (1, C, H, W, 3) as many frames as play starts from
    held = None  # random actions
    if wm.procgen:
        env, frames = start_frames(0, C, wm.env)
        env.close()
        context = frames[None]
        kind = wm.play_kind if what == "play" else wm.action_kind
        held = RIGHT if kind == "real" else wm.latent_for_real_action(RIGHT) if wm.has_key_map else None
    session = wm.play_session(context, steps=steps, seed=0) if what == "play" else Session(wm, context, steps, seed=0)
    rng = np.random.default_rng(0)

    def one_frame():
        action = rng.integers(0, session.num_actions, 1) if held is None else np.array([held])
        session.step(torch.from_numpy(action))  # returns numpy: synced

    for _ in range(wm.play_cfg.model.seq_len):  # fill the dynamics and decoder caches to their window
        one_frame()
    times = time_calls(one_frame, wm.device, seconds, 10)
    ms = 1000 * np.array(times)
    return {
        f"{what}_fps": len(times) / sum(times),
        f"{what}_latency_ms_p50": float(np.percentile(ms, 50)),
        f"{what}_latency_ms_p95": float(np.percentile(ms, 95)),
        f"{what}_maskgit_steps": steps,
        f"{what}_frames_timed": len(times),
    }


# -- the command ---------------------------------------------------------------------------------


def bench(
    checkpoint: str | None = None,
    json_path: str | None = None,
    seconds: float = 10.0,
    maskgit_steps: int | None = None,
    preset: str = "cpu",
    precision: str = "auto",
    overrides: list[str] | None = None,
) -> dict:
    """Measure, print a table, and write SPEC's JSON (plus extra keys) to `json_path` if given.

    `precision` ('auto', 'bf16' or 'fp32'; auto: bf16 only where this device computes it faster) applies to
    training, the matmul peak and play alike, so matmul_peak_share is against the peak of training's precision.
    `overrides` are `train --set` items (e.g. `compile=true`, `dynamics.act_ckpt=false`) for the timed training.
    """
    if not seconds > 0:
        raise UserError(f"--seconds must be positive, got {seconds}")
    check_precision(precision)
    stages, device = prepare(preset, overrides, precision)
    bf16 = stages["dynamics"].train.precision == "bf16"
    # First: a wrong --checkpoint fails before the long part.
    wm, play_note = load_world(checkpoint, device, stages["dynamics"].train.precision)
    # Other work on the machine slows every figure, CPU threads that wait for each other most of all.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    dtype = torch.bfloat16 if bf16 else torch.float32

    _say(f"timing a large {'bf16' if bf16 else 'fp32'} matmul on {device_name(device)} for {seconds:g} s ...")
    peak, n = matmul_flops_per_s(device, dtype, seconds)
    train = {}
    for stage in C.STAGES:
        t = stages[stage].train
        _say(
            f"timing {stage} training ({preset} preset: {t.batch_size} clips x "
            f"{stages[stage].model.seq_len} frames) for {seconds:g} s ..."
        )
        train[stage] = time_training(stage, stages, device, seconds)
    play = {"play_fps": None, "play_latency_ms_p50": None, "play_latency_ms_p95": None}
    if wm is not None:
        _say(f"timing play on {wm.run_dir} for {seconds:g} s ...")
        play = time_play(wm, seconds, maskgit_steps)
        _say(f"timing WorldModel.generate (one stream) for {seconds:g} s ...")
        play |= time_play(wm, seconds, maskgit_steps, "generate")

    result = {
        "device": device_name(device),
        "train_frames_per_s": {s: train[s]["frames_per_s"] for s in C.STAGES},
        "matmul_peak_share": train["dynamics"]["flops_per_s"] / peak,
        **{k: play[k] for k in ("play_fps", "play_latency_ms_p50", "play_latency_ms_p95")},
        # Beyond the SPEC's schema: what the figures above were measured with, and per-stage detail.
        "preset": preset,
        "overrides": list(overrides or []),
        "precision": "bf16" if bf16 else "fp32",
        "precision_asked": precision,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "load_average_at_start": load,
        "torch": torch.__version__,
        "matmul_flops_per_s": peak,
        "matmul_size": n,
        "train_peak_share": {s: train[s]["flops_per_s"] / peak for s in C.STAGES},
        "train": train,
        "play_checkpoint": None if wm is None else str(wm.run_dir),
        "play_maskgit_steps": play.get("play_maskgit_steps"),
        **{k: play.get(k) for k in ("generate_fps", "generate_latency_ms_p95", "generate_maskgit_steps")},
    }
    if play_note:
        result["play_note"] = play_note
    print(table(result))
    if json_path:
        write_json_atomic(json_path, result)
        _say(f"wrote {json_path}")
    return result


def table(r: dict) -> str:
    """The results as a few readable lines."""
    sets = "".join(f", {o}" for o in r.get("overrides", []))
    lines = [
        f"device     {r['device']}  (torch {r['torch']}, {r['precision']}, {r['preset']} preset{sets})",
        f"matmul     {r['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s ({r['matmul_size']}^2 {r['precision']} product)",
        *(
            [
                f"note       the machine was busy (load average {r['load_average_at_start']:.1f} on {r['cores']} "
                "cores): expect lower figures than on an idle one"
            ]
            if (r.get("load_average_at_start") or 0) >= 1
            else []
        ),
        "",
        f"{'training':<10} {'frames/s':>10} {'step ms':>9} {'batch':>8} {'GFLOP/step':>11} {'GFLOP/s':>9} "
        f"{'peak share':>10}",
    ]
    for s, v in r["train"].items():
        lines.append(
            f"{s:<10} {v['frames_per_s']:>10,.1f} {v['step_ms']:>9,.1f} "
            f"{v['batch_size']:>3} x {v['seq_len']:<2} {v['flops_per_step'] / 1e9:>11,.2f} "
            f"{v['flops_per_s'] / 1e9:>9,.1f} {r['train_peak_share'][s]:>10.1%}"
        )
    lines.append("")
    if r["play_fps"] is None:
        lines.append(f"play       {r.get('play_note', 'not measured')}")
    else:
        lines.append(
            f"play       {r['play_fps']:,.1f} frames/s, latency p50 {r['play_latency_ms_p50']:,.1f} ms, "
            f"p95 {r['play_latency_ms_p95']:,.1f} ms ({r['play_maskgit_steps']} MaskGIT steps, batch 1, "
            f"{r['play_checkpoint']})"
        )
        lines.append(
            f"generate   {r['generate_fps']:,.1f} frames/s, latency p95 {r['generate_latency_ms_p95']:,.1f} ms "
            f"({r['generate_maskgit_steps']} MaskGIT steps, batch 1: WorldModel.generate's model, one stream)"
        )
    return "\n".join(lines)
