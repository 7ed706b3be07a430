"""`--set key=value` overrides of a preset's configs, and the checks that keep a bad value from becoming a
shape error deep inside a model."""

from __future__ import annotations

import dataclasses
import typing

from procgenie.config import ACTION_KINDS, MODEL_CONFIGS, PRECISIONS, STAGES, StageConfig, TrainConfig
from procgenie.config import field_types as _field_types
from procgenie.errors import UserError


def _parse_value(raw: str, typ, key: str):
    """Parse one override value to the field's declared type, or raise a one-line UserError."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            v = float(raw)
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError
            return v
        if typ is str:
            return raw
        if origin is tuple:
            parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
            return tuple(int(p) for p in parts)
    except ValueError:
        pass
    want = {bool: "true or false", int: "an integer", float: "a finite number", str: "text"}.get(
        typ, "comma-separated integers like 8,5,5,5"
    )
    raise UserError(f"bad value for --set {key}={raw!r}: expected {want}")


def apply_overrides(stages: dict[str, StageConfig], overrides: list[str], only: tuple[str, ...]) -> None:
    """Apply `key=value` overrides in place to the stages in `only`.

    Keys: `field` (the stage's model, then its train config), `model.field`, `train.field`,
    `<stage>.field` or `<stage>.train.field`.
    """
    for item in overrides:
        if "=" not in item:
            raise UserError(f"bad --set {item!r}: write it as key=value, e.g. --set lr=3e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        targets = only
        if parts[0] in STAGES:
            targets = (parts[0],)
            parts = parts[1:]
            if parts[0:1] == ["model"]:
                parts = parts[1:]
        hit = False
        for stage in targets:
            sc = stages[stage]
            if len(parts) == 1:
                where = [sc.model, sc.train]
            elif len(parts) == 2 and parts[0] in ("model", "train"):
                where = [sc.model if parts[0] == "model" else sc.train]
            else:
                where = []
            name = parts[-1] if parts else ""
            for obj in where:
                types_ = _field_types(type(obj))
                if name in types_:
                    setattr(obj, name, _parse_value(raw, types_[name], key))
                    hit = True
                    break
        if not hit:
            valid = sorted(
                {n for s in only for n in list(_field_types(type(stages[s].model))) + list(_field_types(TrainConfig))}
            )
            raise UserError(f"unknown --set key {key!r} for {'/'.join(only)}: valid keys are {', '.join(valid)}")
    for stage in only:
        validate(stages[stage])


# Model fields that may be 0; every other integer of a model config is a size or a count, at least 1.
MAY_BE_ZERO = {"stem_channels"}


def validate(sc: StageConfig) -> None:
    """Cross-field checks that a bad override would otherwise turn into a shape error deep inside."""
    m, t = sc.model, sc.train
    for name, typ in _field_types(type(m)).items():
        low = 0 if name in MAY_BE_ZERO else 1
        if typ is int and getattr(m, name) < low:
            raise UserError(f"{sc.stage}: {name} must be at least {low}, got {getattr(m, name)}")
    levels = getattr(m, "fsq_levels", (2,))
    if not levels or min(levels) < 2:
        raise UserError(f"{sc.stage}: fsq_levels must be one or more levels of at least 2, got {m.fsq_levels}")
    for name in ("commitment", "temperature"):
        if getattr(m, name, 0) < 0:
            raise UserError(f"{sc.stage}: {name} must not be negative")
    if not 0 <= getattr(m, "mask_min", 0) <= getattr(m, "mask_max", 1) <= 1:
        raise UserError(
            f"{sc.stage}: mask rates must satisfy 0 <= mask_min <= mask_max <= 1, got {m.mask_min} and {m.mask_max}"
        )
    if hasattr(m, "image_size") and m.image_size % m.patch_size:
        raise UserError(f"{sc.stage}: patch_size {m.patch_size} must divide image_size {m.image_size}")
    if m.width % m.heads:
        raise UserError(f"{sc.stage}: width {m.width} must be divisible by heads {m.heads}")
    if getattr(m, "quantizer", "fsq") not in ("fsq", "vq"):
        raise UserError(f"{sc.stage}: quantizer must be 'fsq' or 'vq', not '{m.quantizer}'")
    if not 0 <= getattr(m, "continuous_frac", 0) < 1:
        raise UserError(f"{sc.stage}: continuous_frac must lie in [0, 1), got {m.continuous_frac}")
    if getattr(m, "decode", "sample") not in ("sample", "mean"):
        raise UserError(f"{sc.stage}: decode must be 'sample' or 'mean', not '{m.decode}'")
    if getattr(m, "actions", "latent") not in ACTION_KINDS:
        raise UserError(f"{sc.stage}: actions must be 'latent' or 'real', not '{m.actions}'")
    if not 0 <= getattr(m, "action_dropout", 0) < 1:
        raise UserError(f"{sc.stage}: action_dropout must lie in [0, 1), got {m.action_dropout}")
    if getattr(m, "action_cond", "token") not in ("token", "add"):
        raise UserError(f"{sc.stage}: action_cond must be 'token' or 'add', not '{m.action_cond}'")
    if m.seq_len < 2 and sc.stage != "tokenizer":
        raise UserError(f"{sc.stage}: seq_len must be at least 2")
    if t.precision not in PRECISIONS:
        raise UserError(f"{sc.stage}: train.precision must be auto, bf16 or fp32, not '{t.precision}'")
    if t.batch_size < 1 or t.steps < 0 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise UserError(
            f"{sc.stage}: batch_size {t.batch_size} must be a positive multiple of grad_accum {t.grad_accum}"
        )
    for name in ("lr", "warmup", "weight_decay", "grad_clip", "seed", "workers"):
        if getattr(t, name) < 0:
            raise UserError(f"{sc.stage}: train.{name} must not be negative")
    if t.log_every < 1 or t.ckpt_every < 1:
        raise UserError(f"{sc.stage}: train.log_every and train.ckpt_every must be at least 1")
    if not 0 <= t.min_lr_frac <= 1:
        raise UserError(f"{sc.stage}: train.min_lr_frac must lie in 0..1, got {t.min_lr_frac}")
    if t.lr > 1e37:  # AdamW's first step is lr / (1 - beta1) = 10 lr: past float32's ~3.4e38 it cannot be applied
        raise UserError(f"{sc.stage}: train.lr {t.lr:g} is too large to apply; learning rates lie around 1e-4 to 1e-2")


def help_text(stages: tuple[str, ...]) -> str:
    """The `--set` keys with their help lines, for argparse epilogs."""
    lines = []
    for stage in stages:
        cls = MODEL_CONFIGS[stage]
        lines.append(f"{stage} model keys (--set {stage}.KEY=V or KEY=V):")
        lines += [f"  {f.name:<15} {f.metadata['help']} [{f.default}]" for f in dataclasses.fields(cls)]
    lines.append("train keys (--set train.KEY=V or KEY=V), defaults of the cpu preset vary by stage:")
    lines += [f"  {f.name:<15} {f.metadata['help']}" for f in dataclasses.fields(TrainConfig)]
    return "\n".join(lines)
