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

import ctypes
import ctypes.util
import json
import math
import os
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
from procgenie.atomic import exclusive, remove_stale_tmp, write_bytes_atomic
from procgenie.data.loader import ClipSampler, batches
from procgenie.data.store import Dataset
from procgenie.errors import Stopped, UserError
from procgenie.models import build_for_training, check_data, write_action_map
from procgenie.nn.blocks import STTransformer
from procgenie.precision import autocast, resolve
from procgenie.stopping import StopSignals

# Fields that may change when a run is resumed; any other difference means another experiment. The
# speed and memory knobs are among them: a run may resume on other hardware (grad_accum keeps the global
# batch; only which rows share a mask seed changes).
VAL_BATCHES = 4  # val-split batches behind each logged validation loss
RESUMABLE_CHANGES = {"steps", "workers", "log_every", "ckpt_every", "grad_accum", "compile", "act_ckpt", "precision"}


# -- distributed set-up ------------------------------------------------------------------------

def distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def set_cpu_threads(local_world: int = 1) -> None:
    """Share this machine's cores among the `local_world` processes that train on it.

    A single process keeps an explicit OMP_NUM_THREADS; torchrun sets that to 1 for every rank by
    default, which would leave cores idle, so under torchrun the cores are always shared out.
    """
    if local_world > 1 or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, _cores() // local_world))


def _cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def speed_settings(device: torch.device, deterministic: bool) -> None:
    """Fast kernels that keep training's results: TF32 matmuls and convolutions and cuDNN autotuning on CUDA;
    on a CPU, freed memory kept for reuse (`keep_freed_memory`).

    TF32 (fp32's range, a 10-bit mantissa) is finer than the bf16 that autocast already computes most
    matmuls in. (bf16 autocast, fused AdamW, flash attention through SDPA, activation checkpointing and
    pinned-memory loading are set where they are used.)
    """
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not deterministic  # the shapes never change: tune once per conv


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the kernel (Linux only).

    PyTorch's CPU allocator has no cache: glibc serves each block over 32 MB (the dynamics model's logits,
    their float32 copy, their gradient) from fresh pages and unmaps them when freed, so every training
    step page-faults and zero-fills ~170 MB anew. Kept in the heap instead, a fresh 44 MB float32 copy
    costs 2.4 ms instead of 17, and the cpu preset's dynamics step about 10% less (docs/benchmarks.md).
    The process keeps its peak heap until it exits. Returns whether the setting took.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameters (malloc.h)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc: leave the allocator as it is
        return False


def _mean_across_ranks(values: dict, device) -> dict:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _any_rank(flag: bool, device) -> bool:
    """Is `flag` true on any rank? (A signal may reach one rank first; all must stop at the same step.)"""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def _finite_everywhere(ok: bool, device) -> bool:
    """Is `ok` (the loss is finite) true on every rank? All ranks must stop together, or the others wait forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    t = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0


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


def make_optimizer(model: torch.nn.Module, t: C.TrainConfig, device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "codebook" not in name and "pos_" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def fit(model: torch.nn.Module, sc: C.StageConfig, sampler: ClipSampler, stage_dir: Path, device,
        rank: int = 0, world: int = 1, quiet: bool = False, val: ClipSampler | None = None) -> dict:
    """Train `model` to sc.train.steps, resuming from stage_dir/state.safetensors if there is one; at every
    checkpoint, the loss on `val` (the val split's clips, where there are any) goes into val.jsonl."""
    t = sc.train
    opt = make_optimizer(model, t, device)
    state_path = stage_dir / "state.safetensors"
    start = 0
    if state_path.exists():
        start = ckpt.load_state(state_path, model, opt)["step"]
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
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None, gradient_as_bucket_view=True)
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
        for step, batch in enumerate(batches(sampler, start, t.steps, workers=t.workers,
                                             pin_memory=device.type == "cuda"), start):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, t)
            metrics = train_step(net, model, opt, batch, t, device, step, rank)
            # A non-finite gradient norm has already spoilt the weights, even where the loss was finite.
            if not _finite_everywhere(math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("grad_norm", 0.0)),
                                      device):
                raise _diverged(sc.stage, step, saved, t)
            bar.update(1)
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                metrics = _mean_across_ranks(metrics, device)
                fps = frames_per_step * (done - tic_step) / (time.perf_counter() - tic)
                tic, tic_step = time.perf_counter(), done
                last = {"step": done, "lr": lr_at(step, t), "frames_per_s": fps, **metrics}
                if rank == 0:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "psnr", "acc")}
                                    | {"fps": f"{fps:.0f}"}, refresh=False)
                    log.write(json.dumps({"time": time.time(), **last}) + "\n")
                    log.flush()
                    for k, v in last.items():
                        if tb is not None and k != "step":
                            tb.add_scalar(f"{sc.stage}/{k}", v, done)
            if done % t.ckpt_every == 0 or done == t.steps:
                # Without grad_clip there is no gradient norm to check: never checkpoint weights that are not finite.
                if not _finite_everywhere(all(bool(p.isfinite().all()) for p in model.parameters()), device):
                    raise _diverged(sc.stage, step, saved, t)
                _checkpoint(model, opt, done, stage_dir, rank)
                saved = done
                if val is not None and rank == 0:
                    loss = validation_loss(model, val, t, device)
                    with open(stage_dir / "val.jsonl", "a") as f:
                        f.write(json.dumps({"time": time.time(), "step": done, "val_loss": loss}) + "\n")
                    if tb is not None:
                        tb.add_scalar(f"{sc.stage}/val_loss", loss, done)
            if _any_rank(stop.signum is not None, device) and done < t.steps:
                if saved != done:
                    _checkpoint(model, opt, done, stage_dir, rank)
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                raise Stopped(f"stopped by {name} at step {done} of {t.steps}; checkpoint saved in {stage_dir}: "
                              "rerun the same command to resume", 128 + (stop.signum or signal.SIGTERM))
    finally:
        stop.__exit__()
        bar.close()
        if log:
            log.close()
        if tb is not None:
            tb.close()
    return last


def train_step(net, model, opt, batch, t: C.TrainConfig, device, step: int = 0, rank: int = 0) -> dict:
    """One optimizer step over t.grad_accum micro-batches of this rank's rows; returns the mean metrics.

    Each micro-batch's loss is a mean over its rows; DDP averages gradients over ranks and the
    accumulation divides by t.grad_accum, so the step's gradient is the mean over the global batch.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if hasattr(model, "set_step"):  # a model whose training changes with the step (the LAM's warm-up)
        model.set_step(step, t.steps)
    n = next(iter(batch.values())).shape[0]
    micro = max(1, n // t.grad_accum)
    totals: dict[str, float] = {}
    for i in range(t.grad_accum):
        part = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
        torch.manual_seed(chunk_seed(t.seed, step, rank * t.grad_accum + i))
        sync = i == t.grad_accum - 1 or not hasattr(net, "no_sync")
        with (nullcontext() if sync else net.no_sync()), autocast(device, resolve(t.precision, device)):
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
def validation_loss(model: torch.nn.Module, val: ClipSampler, t: C.TrainConfig, device, batches: int = VAL_BATCHES
                    ) -> float:
    """The mean loss over the same `batches` val-split batches every time (masks seeded alike). Training's own
    random numbers are not disturbed: each training step seeds them itself."""
    model.eval()
    total = 0.0
    for i in range(batches):
        batch = {k: v.to(device) for k, v in val.batch(i).items()}
        torch.manual_seed(chunk_seed(t.seed, i, 0))
        with autocast(device, resolve(t.precision, device)):
            total += float(model(batch)[0]) / batches
    model.train()
    return total


def _diverged(stage: str, step: int, saved: int, t: C.TrainConfig) -> UserError:
    kept = f"the checkpoint of step {saved} is kept" if saved else "nothing was checkpointed"
    return UserError(f"{stage}: the loss became non-finite at step {step}; {kept}: lower the learning rate "
                     f"(--set lr={t.lr / 3:.2g}) and train into another --run")


def _checkpoint(model, opt, step: int, stage_dir: Path, rank: int) -> None:
    if rank == 0:
        # The weights first and the trainer state last: a rerun resumes from the state, so a kill between the
        # two redoes these steps and rewrites the weights. (The other order, killed at the last step, left a
        # finished stage whose model.safetensors was one checkpoint behind.)
        ckpt.save_weights(stage_dir / "model.safetensors", model, {"step": step})
        ckpt.save_state(stage_dir / "state.safetensors", model, opt, step, {})
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


# -- commands ----------------------------------------------------------------------------------

def resolve_stage_config(stage: str, run: Path, preset: str | None, steps: int | None,
                         overrides: list[str]) -> tuple[C.StageConfig, str, Path]:
    """The config to train with (the preset plus overrides, checked against a run being resumed), the preset's
    name and the stage's folder (a dynamics model on real actions trains beside the latent one)."""
    if steps is not None:
        overrides = [f"steps={steps}", *overrides]
    kind = C.preset(preset or "cpu")
    C.apply_overrides(kind, overrides, (stage,))
    stage_dir = run / C.stage_folder(stage, kind[stage].model)
    saved = ckpt.read_config(stage_dir, stage) if (stage_dir / "config.json").exists() else None
    name = preset or (saved[1].get("preset") if saved else None) or "cpu"
    stages = C.preset(name)
    C.apply_overrides(stages, overrides, (stage,))
    sc = stages[stage]
    if saved:
        old = C.to_dict(saved[0])
        new = C.to_dict(sc)
        diffs = [f"{sec}.{k} {old[sec][k]!r} (now {new[sec][k]!r})" for sec in ("model", "train") for k in new[sec]
                 if old[sec].get(k) != new[sec][k] and not (sec == "train" and k in RESUMABLE_CHANGES)]
        if diffs:
            raise UserError(f"{stage_dir} was trained with other settings: {', '.join(diffs[:4])}; rerun with the "
                            "same settings to resume, or choose another --run")
    return sc, name, stage_dir


def train_stage(stage: str, data: str, run: str, preset: str | None = None, steps: int | None = None,
                overrides: list[str] | None = None, quiet: bool = False) -> dict:
    rank, world, device = distributed()
    run_dir = Path(run)
    sc, preset_name, stage_dir = resolve_stage_config(stage, run_dir, preset, steps, overrides or [])
    ds = Dataset(data)
    if sc.train.batch_size % (world * sc.train.grad_accum):
        raise UserError(f"{stage}: batch_size {sc.train.batch_size} must be divisible by {world} ranks x "
                        f"grad_accum {sc.train.grad_accum}")
    torch.manual_seed(sc.train.seed)  # the same initial weights on every rank
    if sc.train.deterministic:
        torch.use_deterministic_algorithms(True)
    speed_settings(device, sc.train.deterministic)
    model, links = build_for_training(stage, sc, ds, run_dir, device)
    trained = check_resume(stage_dir, stage, ds, links)
    # One training process per stage folder (under torchrun rank 0 holds the lock for all ranks), taken
    # before the first write.
    with exclusive(stage_dir, f"training {stage_dir}") if rank == 0 else nullcontext():
        if rank == 0 and trained < sc.train.steps:  # a finished stage keeps the config it was trained with
            ckpt.write_config(stage_dir, sc, {"preset": preset_name, "links": links,
                                              "precision_used": resolve(sc.train.precision, device),
                                              "data": {"path": str(Path(data).resolve()), "env": ds.env,
                                                       "image_size": ds.image_size}})
        if world > 1:
            dist.barrier()
        sampler = ClipSampler(ds, "train", sc.model.seq_len, sc.train.batch_size, seed=sc.train.seed, rank=rank,
                              world=world)
        if rank == 0 and not quiet:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"{stage}: {n / 1e6:.2f}M parameters, preset {preset_name}, {sc.train.steps} steps of "
                  f"{sc.train.batch_size} clips x {sc.model.seq_len} frames on {device}, "
                  f"{resolve(sc.train.precision, device)} (precision {sc.train.precision})"
                  + (f" x {world} ranks" if world > 1 else ""))
        val = None
        if rank == 0 and len(ds.episodes("val")) and (ds.episodes("val")["length"] >= sc.model.seq_len).any():
            val = ClipSampler(ds, "val", sc.model.seq_len, sc.train.batch_size, seed=sc.train.seed)
        result = fit(model, sc, sampler, stage_dir, device, rank, world, quiet, val)
        if stage == "lam" and rank == 0:  # which latent action each real action tends to be, for play
            write_action_map(run_dir, model, sampler, device)
    if world > 1:
        dist.barrier()
    return result


def check_resume(stage_dir: Path, stage: str, ds: Dataset, links: dict) -> int:
    """The step a stage resumes from, after refusing to continue it on another game's frames, or a dynamics
    model on another tokenizer or LAM.

    Before anything is written: rewriting config.json would pass the mismatch off as the run's own.
    """
    if not (stage_dir / "config.json").exists():
        return 0
    _, extra = ckpt.read_config(stage_dir, stage)
    state = stage_dir / "state.safetensors"
    step = ckpt.state_meta(state)["step"] if state.exists() else 0  # a damaged state: named here, first
    check_data(extra, ds, f"{stage} in {stage_dir}", other="train into another --run")
    if not state.exists() and not (stage_dir / "model.safetensors").exists():
        return 0  # nothing trained yet: the links are free to change
    for what, link in links.items():
        want = extra.get("links", {}).get(what, {}).get("fingerprint")
        if want != link["fingerprint"]:
            raise UserError(f"{stage_dir} was trained with another {what} (weights {want}, now {link['fingerprint']}): "
                            f"restore that {what}, or train the {stage} stage into another --run")
    return step


def train_stages(stage: str, data: str, run: str, preset: str | None = None, steps: int | None = None,
                 overrides: list[str] | None = None) -> None:
    stages = C.STAGES if stage == "all" else (stage,)
    overrides = overrides or []
    if Path(run).exists() and not Path(run).is_dir():
        raise UserError(f"--run {run} is a file: give a folder for the run")
    lost = [o for o in overrides if not any(_applies(s, o) for s in stages)]
    if lost:  # let the usual check name the unknown key
        C.apply_overrides(C.preset("cpu"), lost, stages)
    for s in stages:
        train_stage(s, data, run, preset, steps, [o for o in overrides if _applies(s, o)])


def _applies(stage: str, override: str) -> bool:
    """Does `--set key=value` concern this stage? (Under `train all` a plain key goes where it fits.)"""
    import dataclasses
    parts = override.split("=")[0].strip().split(".")
    if parts[0] in C.STAGES:
        return parts[0] == stage
    fields = {f.name for f in dataclasses.fields(C.TrainConfig)}
    if parts[0] != "train":
        fields |= {f.name for f in dataclasses.fields(C.MODEL_CONFIGS[stage])}
    return parts[-1] in fields
