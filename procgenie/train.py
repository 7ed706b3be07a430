"""The one training loop, for every stage: `model.loss(batch) -> (loss, metrics)` is all it needs.

AdamW with warmup and cosine decay, gradient clipping and accumulation, bf16 autocast, a progress
bar, JSONL + TensorBoard logs, atomic checkpoints every `ckpt_every` steps, exact resume (weights,
optimizer and step; batches and the loss's random draws are functions of the step), a clean stop on a
non-finite loss, and data parallelism under torchrun (DDP: NCCL on GPUs, gloo on CPU).

Data parallelism gives a single process's results at the same global batch: rank r of W takes rows
[r*B/W, (r+1)*B/W) of the step's batch, DDP averages the gradients, and each micro-batch seeds the
RNG from the global rows it holds (`chunk_seed`), so W ranks x A accumulation steps draw the same
dynamics masks as one process with W*A accumulation steps. A run resumes with any number of ranks.
(torchrun's own parser takes `--run` for its `--run-path`: write `--` before the procgenie command,
`torchrun --nproc-per-node 2 -m procgenie -- train all --data D --run R`.)
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from procgenie import checkpoint as ckpt
from procgenie import config as C
from procgenie.atomic import remove_stale_tmp, write_bytes_atomic
from procgenie.data.loader import ClipSampler, batches
from procgenie.errors import Stopped, UserError
from procgenie.nn.blocks import STTransformer
from procgenie.nn.stage import StageModel
from procgenie.precision import autocast, resolve
from procgenie.runtime import any_rank, finite_everywhere, mean_across_ranks
from procgenie.stopping import StopSignals

VAL_BATCHES = 4  # val-split batches behind each logged validation loss


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The torch RNG seed of one micro-batch: chunk j of step `step` holds global rows [j*m, (j+1)*m).

    The random numbers a model draws in its loss (the dynamics model's masks) are then a function of
    (seed, step, rows), like the batch itself: resume needs no RNG state, and W ranks with A
    accumulation steps draw exactly the masks of any other layout with the same W*A, one process included.
    """
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, np.uint64)[0]) >> 1


def set_act_ckpt(model: torch.nn.Module, on: bool) -> None:
    """Activation checkpointing in every ST-transformer of `model` (the models build them with it off)."""
    for m in model.modules():
        if isinstance(m, STTransformer):
            m.act_ckpt = on


# -- the loop ----------------------------------------------------------------------------------


def lr_at(step: int, t: C.TrainConfig) -> float:
    """Linear warmup to t.lr, then cosine decay to t.lr * t.min_lr_frac at t.steps."""
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    frac = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
    return t.lr * (t.min_lr_frac + (1 - t.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def run_precision(state_path: Path, t: C.TrainConfig, device) -> str:
    """What a run computes in: `auto` is decided once per run, not per process, so a resumed run keeps the
    precision it started in (on a busy CPU the bf16-vs-fp32 timing can go either way; a switch broke exact
    resume). Every rank alike: fp32 if any rank would take it."""
    saved = ckpt.state_meta(state_path).get("precision") if state_path.exists() else None
    precision = saved if t.precision == "auto" and saved else resolve(t.precision, device)
    return "fp32" if any_rank(precision == "fp32", device) else precision


def make_optimizer(model: StageModel, t: C.TrainConfig, device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.decay_groups(t.weight_decay), lr=t.lr, betas=(0.9, 0.95), fused=device.type == "cuda"
    )


def fit(
    model: torch.nn.Module,
    sc: C.StageConfig,
    sampler: ClipSampler,
    stage_dir: Path,
    device,
    rank: int = 0,
    world: int = 1,
    quiet: bool = False,
    val: ClipSampler | None = None,
    precision: str | None = None,
) -> dict:
    """Train `model` to sc.train.steps, resuming from stage_dir/state.safetensors if there is one; at every
    checkpoint, the loss on `val` (the val split's clips, where there are any) goes into val.jsonl. `precision`:
    the run's (`run_precision`), where the caller has it already."""
    t = sc.train
    opt = make_optimizer(model, t, device)
    state_path = stage_dir / "state.safetensors"
    precision = precision or run_precision(state_path, t, device)
    start = ckpt.load_state(state_path, model, opt)["step"] if state_path.exists() else 0
    if rank == 0:  # what a killed run left behind: half-written checkpoints, log lines of steps it redoes
        remove_stale_tmp(stage_dir)
        _trim_log(stage_dir / "log.jsonl", start)
        _trim_log(stage_dir / "val.jsonl", start)
    if start >= t.steps:
        if rank == 0 and not quiet:
            print(f"{sc.stage}: already trained to step {start} ({stage_dir})")
        return {"step": start}
    set_act_ckpt(model, t.act_ckpt)
    net = model  # what runs the steps; `model` stays the plain module that checkpoints save
    if world > 1:
        # A 1x1 convolution's weight gradient comes back with permuted strides under bf16 autocast; DDP
        # copies it into its bucket at no real cost but warns on every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # Gradients as views into the all-reduce buckets: no copy in or out of them.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    if t.compile:
        net = torch.compile(net)
    log = open(stage_dir / "log.jsonl", "a") if rank == 0 else None
    tb = _tensorboard(stage_dir) if rank == 0 else None
    bar = tqdm(total=t.steps, initial=start, desc=sc.stage, disable=rank != 0 or quiet, dynamic_ncols=True)
    frames_per_step = t.batch_size * sampler.seq_len
    last = {"step": start}
    saved = start  # the step of the checkpoint on disk
    tic, tic_step = time.perf_counter(), start
    model.train()
    stop = StopSignals()
    try:
        stop.__enter__()
        for step, batch in enumerate(
            batches(sampler, start, t.steps, workers=t.workers, pin_memory=device.type == "cuda"), start
        ):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, t)
            metrics = train_step(net, model, opt, batch, t, device, step, rank, precision)
            # A non-finite gradient norm has already spoilt the weights, even where the loss was finite.
            if not finite_everywhere(
                math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("grad_norm", 0.0)), device
            ):
                raise _diverged(sc.stage, step, saved, t)
            bar.update(1)
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                metrics = mean_across_ranks(metrics, device)
                fps = frames_per_step * (done - tic_step) / (time.perf_counter() - tic)
                tic, tic_step = time.perf_counter(), done
                last = {"step": done, "lr": lr_at(step, t), "frames_per_s": fps, **metrics}
                if rank == 0:
                    bar.set_postfix(
                        {k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "psnr", "acc")}
                        | {"fps": f"{fps:.0f}"},
                        refresh=False,
                    )
                    log.write(json.dumps({"time": time.time(), **last}) + "\n")
                    log.flush()
                    for k, v in last.items():
                        if tb is not None and k != "step":
                            tb.add_scalar(f"{sc.stage}/{k}", v, done)
            if done % t.ckpt_every == 0 or done == t.steps:
                # Without grad_clip there is no gradient norm to check: never checkpoint weights that are not finite.
                if not finite_everywhere(all(bool(p.isfinite().all()) for p in model.parameters()), device):
                    raise _diverged(sc.stage, step, saved, t)
                _checkpoint(model, opt, done, stage_dir, rank, precision)
                saved = done
                if val is not None and rank == 0:
                    loss = validation_loss(model, val, t, device, precision)
                    with open(stage_dir / "val.jsonl", "a") as f:
                        f.write(json.dumps({"time": time.time(), "step": done, "val_loss": loss}) + "\n")
                    if tb is not None:
                        tb.add_scalar(f"{sc.stage}/val_loss", loss, done)
            if any_rank(stop.signum is not None, device) and done < t.steps:
                if saved != done:
                    _checkpoint(model, opt, done, stage_dir, rank, precision)
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                raise Stopped(
                    f"stopped by {name} at step {done} of {t.steps}; checkpoint saved in {stage_dir}: "
                    "rerun the same command to resume",
                    128 + (stop.signum or signal.SIGTERM),
                )
    finally:
        stop.__exit__()
        bar.close()
        if log:
            log.close()
        if tb is not None:
            tb.close()
    return last


def train_step(
    net, model, opt, batch, t: C.TrainConfig, device, step: int = 0, rank: int = 0, precision: str | None = None
) -> dict:
    """One optimizer step over t.grad_accum micro-batches of this rank's rows (in `precision`, by default
    what t.precision resolves to); returns the mean metrics.

    Each micro-batch's loss is a mean over its rows; DDP averages gradients over ranks and the
    accumulation divides by t.grad_accum, so the step's gradient is the mean over the global batch.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    model.set_step(step, t.steps)
    n = next(iter(batch.values())).shape[0]
    micro = max(1, n // t.grad_accum)
    precision = precision or resolve(t.precision, device)
    totals: dict[str, float] = {}
    for i in range(t.grad_accum):
        part = {k: v[i * micro : (i + 1) * micro] for k, v in batch.items()}
        torch.manual_seed(chunk_seed(t.seed, step, rank * t.grad_accum + i))
        sync = i == t.grad_accum - 1 or not hasattr(net, "no_sync")
        with nullcontext() if sync else net.no_sync(), autocast(device, precision):
            loss, metrics = net(part)
        (loss / t.grad_accum).backward()
        # float() here rather than .item() in the model: metrics may come back as tensors, which keeps a
        # torch.compile graph whole
        for k, v in {"loss": loss.detach(), **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) / t.grad_accum
    if t.grad_clip > 0:
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return totals


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, val: ClipSampler, t: C.TrainConfig, device, precision: str, batches: int = VAL_BATCHES
) -> float:
    """The mean loss over the same `batches` val-split batches every time (masks seeded alike). Training's own
    random numbers are not disturbed: each training step seeds them itself."""
    model.eval()
    total = 0.0
    for i in range(batches):
        batch = {k: v.to(device) for k, v in val.batch(i).items()}
        torch.manual_seed(chunk_seed(t.seed, i, 0))
        with autocast(device, precision):
            total += float(model(batch)[0]) / batches
    model.train()
    return total


def _diverged(stage: str, step: int, saved: int, t: C.TrainConfig) -> UserError:
    kept = f"the checkpoint of step {saved} is kept" if saved else "nothing was checkpointed"
    return UserError(
        f"{stage}: the loss became non-finite at step {step}; {kept}: lower the learning rate "
        f"(--set lr={t.lr / 3:.2g}) and train into another --run"
    )


def _checkpoint(model, opt, step: int, stage_dir: Path, rank: int, precision: str) -> None:
    if rank == 0:
        # The weights first and the trainer state last: a rerun resumes from the state, so a kill between the
        # two redoes these steps and rewrites the weights. (The other order, killed at the last step, left a
        # finished stage whose model.safetensors was one checkpoint behind.)
        ckpt.save_weights(stage_dir / "model.safetensors", model, {"step": step})
        ckpt.save_state(stage_dir / "state.safetensors", model, opt, step, {"precision": precision})
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _trim_log(path: Path, step: int) -> None:
    """Keep the log records up to `step`, where a resumed run starts: a killed run logged steps it will redo."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # the torn last line of a killed run
            pass
    write_bytes_atomic(path, "".join(keep).encode())


def _tensorboard(stage_dir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: the JSONL log always exists
        return None
    return SummaryWriter(str(stage_dir / "tb"), flush_secs=30)
