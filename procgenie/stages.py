"""`procgenie train`: the stages composed in the open. Each stage's config comes from a preset and `--set`
overrides (checked against the run it resumes), its model from `models.build_for_training` (the dynamics
model on the run's frozen tokenizer and LAM), its batches from the dataset's train split; `train.fit`
runs the one loop. What a stage leaves for later stages and for play besides its weights is in FINISH.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from procgenie import checkpoint as ckpt
from procgenie import config as C
from procgenie.atomic import exclusive
from procgenie.data.loader import ClipSampler
from procgenie.data.store import Dataset
from procgenie.errors import UserError
from procgenie.models import Links, build_for_training, check_data, write_action_map
from procgenie.overrides import apply_overrides
from procgenie.runtime import distributed, speed_settings
from procgenie.train import fit, run_precision

# Fields that may change when a run is resumed; any other difference means another experiment. The
# speed and memory knobs are among them: a run may resume on other hardware (grad_accum keeps the global
# batch; only which rows share a mask seed changes).
RESUMABLE_CHANGES = {"steps", "workers", "log_every", "ckpt_every", "grad_accum", "compile", "act_ckpt", "precision"}
# What a stage writes after training, for the stages and commands after it: the LAM, which latent action each
# real action tends to be (and how often each latent is used), for play's keys.
FINISH = {"lam": write_action_map}


def resolve_stage_config(
    stage: str, run: Path, preset: str | None, steps: int | None, overrides: list[str]
) -> tuple[C.StageConfig, str, Path]:
    """The config to train with (the preset plus overrides, checked against a run being resumed), the preset's
    name and the stage's folder (a dynamics model on real actions trains beside the latent one)."""
    if steps is not None:
        overrides = [f"steps={steps}", *overrides]
    kind = C.preset(preset or "cpu")
    apply_overrides(kind, overrides, (stage,))
    stage_dir = run / C.stage_folder(stage, kind[stage].model)
    saved = ckpt.read_config(stage_dir, stage) if (stage_dir / "config.json").exists() else None
    name = preset or (saved[1].get("preset") if saved else None) or "cpu"
    stages = C.preset(name)
    apply_overrides(stages, overrides, (stage,))
    sc = stages[stage]
    if saved:
        old = C.to_dict(saved[0])
        new = C.to_dict(sc)
        diffs = [
            f"{sec}.{k} {old[sec][k]!r} (now {new[sec][k]!r})"
            for sec in ("model", "train")
            for k in new[sec]
            if old[sec].get(k) != new[sec][k] and not (sec == "train" and k in RESUMABLE_CHANGES)
        ]
        if diffs:
            raise UserError(
                f"{stage_dir} was trained with other settings: {', '.join(diffs[:4])}; rerun with the "
                "same settings to resume, or choose another --run"
            )
    return sc, name, stage_dir


def train_stage(stage: str, data: str, run: str, preset: str | None, steps: int | None, overrides: list[str]) -> dict:
    rank, world, device = distributed()
    run_dir = Path(run)
    sc, preset_name, stage_dir = resolve_stage_config(stage, run_dir, preset, steps, overrides)
    ds = Dataset(data)
    if stage == "dynamics" and sc.model.actions == "real" and not ds.has_actions:
        raise UserError(
            f"{ds.root} has no actions (imported recordings): a dynamics model on real actions needs "
            "them; train Genie's latent one (actions=latent, the default)"
        )
    if sc.train.batch_size % (world * sc.train.grad_accum):
        raise UserError(
            f"{stage}: batch_size {sc.train.batch_size} must be divisible by {world} ranks x "
            f"grad_accum {sc.train.grad_accum}"
        )
    torch.manual_seed(sc.train.seed)  # the same initial weights on every rank
    if sc.train.deterministic:
        torch.use_deterministic_algorithms(True)
    speed_settings(device, sc.train.deterministic)
    model, links = build_for_training(stage, sc, ds, run_dir, device)
    trained = check_resume(stage_dir, stage, ds, links)
    # One training process per stage folder (under torchrun rank 0 holds the lock for all ranks), taken
    # before the first write.
    precision = run_precision(stage_dir / "state.safetensors", sc.train, device)
    with exclusive(stage_dir, f"training {stage_dir}") if rank == 0 else nullcontext():
        if rank == 0 and trained < sc.train.steps:  # a finished stage keeps the config it was trained with
            ckpt.write_config(
                stage_dir,
                sc,
                {
                    "preset": preset_name,
                    "links": links.to_json() if links else {},
                    "precision_used": precision,
                    "data": {
                        "path": str(Path(data).resolve()),
                        "env": ds.env,
                        "image_size": ds.image_size,
                        "actions": ds.has_actions,
                    },
                },
            )
        if world > 1:
            dist.barrier()
        sampler = ClipSampler(
            ds, "train", sc.model.seq_len, sc.train.batch_size, seed=sc.train.seed, rank=rank, world=world
        )
        if rank == 0:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(
                f"{stage}: {n / 1e6:.2f}M parameters, preset {preset_name}, {sc.train.steps} steps of "
                f"{sc.train.batch_size} clips x {sc.model.seq_len} frames on {device}, "
                f"{precision} (precision {sc.train.precision})" + (f" x {world} ranks" if world > 1 else "")
            )
        val = None
        if rank == 0 and len(ds.episodes("val")) and (ds.episodes("val")["length"] >= sc.model.seq_len).any():
            val = ClipSampler(ds, "val", sc.model.seq_len, sc.train.batch_size, seed=sc.train.seed)
        result = fit(model, sc, sampler, stage_dir, device, rank, world, val=val, precision=precision)
        if stage in FINISH and rank == 0:
            FINISH[stage](run_dir, model, sampler, device)
    if world > 1:
        dist.barrier()
    return result


def check_resume(stage_dir: Path, stage: str, ds: Dataset, links: Links | None) -> int:
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
    if links is None:
        return step
    trained_on = Links.from_json(extra.get("links", {})).fingerprints
    for what, now in links.fingerprints.items():
        if trained_on.get(what) != now:
            raise UserError(
                f"{stage_dir} was trained with another {what} (weights {trained_on.get(what)}, now {now}): "
                f"restore that {what}, or train the {stage} stage into another --run"
            )
    return step


def train_stages(
    stage: str,
    data: str,
    run: str,
    preset: str | None = None,
    steps: int | None = None,
    overrides: list[str] | None = None,
) -> None:
    stages = C.STAGES if stage == "all" else (stage,)
    overrides = overrides or []
    if Path(run).exists() and not Path(run).is_dir():
        raise UserError(f"--run {run} is a file: give a folder for the run")
    lost = [o for o in overrides if not any(_applies(s, o) for s in stages)]
    if lost:  # let the usual check name the unknown key
        apply_overrides(C.preset("cpu"), lost, stages)
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
