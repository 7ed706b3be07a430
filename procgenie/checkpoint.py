"""Run folders: `RUN/<stage>/config.json` + `model.safetensors` (+ `state.safetensors` to resume).

No pickle anywhere: weights and optimizer state are safetensors, everything else JSON. Every write is
atomic. A loader rebuilds a model from its config.json alone and checks that the stages of a run
belong together (a dynamics model records the fingerprints of the tokenizer and LAM it was trained on).
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from procgenie import config as C
from procgenie.atomic import read_json_object, write_atomic, write_json_atomic
from procgenie.errors import UserError

FORMAT_VERSION = 1
PRETRAINED = Path(__file__).parent / "pretrained" / "coinrun"


def resolve_run(run: str | Path | None) -> Path:
    """A run folder, or the bundled pretrained world model when `run` is None."""
    if run is None:
        if not (PRETRAINED / "dynamics" / "model.safetensors").exists():
            raise UserError(
                "no bundled pretrained model in this install: pass --checkpoint RUN "
                "(train one with `procgenie train all --data DIR --run RUN`)"
            )
        return PRETRAINED
    path = Path(run)
    if not path.is_dir():
        raise UserError(f"no run folder at {path}: train one with `procgenie train all --data DIR --run {path}`")
    return path


def _guard_disk(fn, what: Path):
    try:
        fn()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing {what}; the previous checkpoint is intact: free some "
                "space and rerun the same command"
            ) from None
        raise


def write_config(stage_dir: Path, sc: C.StageConfig, extra: dict) -> None:
    obj = {"format_version": FORMAT_VERSION, **C.to_dict(sc), **extra}
    _guard_disk(lambda: write_json_atomic(stage_dir / "config.json", obj), stage_dir / "config.json")


def read_config(stage_dir: Path, stage: str) -> tuple[C.StageConfig, dict]:
    """The StageConfig and the extra fields (links, data, preset) of `stage_dir/config.json`."""
    path = stage_dir / "config.json"
    if not path.exists():
        raise UserError(
            f"{stage_dir} has no trained {stage} (no config.json): train it with "
            f"`procgenie train {stage} --data DIR --run {stage_dir.parent}`"
        )
    obj = read_json_object(path, "retrain this stage")
    if obj.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} was written by an incompatible procgenie version (format "
            f"{obj.get('format_version')}, this version reads {FORMAT_VERSION}): retrain this stage"
        )
    if obj.get("stage") != stage:
        raise UserError(f"{stage_dir} holds a {obj.get('stage')} checkpoint, not a {stage}: check the run folder")
    sc = C.from_dict(obj)
    extra = {k: v for k, v in obj.items() if k not in ("format_version", "stage", "model", "train")}
    return sc, extra


def save_weights(path: Path, model: torch.nn.Module, meta: dict, dtype: torch.dtype | None = None) -> None:
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    _guard_disk(
        lambda: write_atomic(
            path, lambda tmp: save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
        ),
        path,
    )


def load_weights(path: Path, model: torch.nn.Module) -> dict:
    """Load safetensors weights into `model` (casting to its dtypes); returns the file's metadata."""
    if not path.exists():
        raise UserError(f"{path} is missing: this stage was never checkpointed; train it first")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({e}): retrain this stage, or restore the file") from None
    own = model.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise UserError(
            f"{path} does not fit the model its config.json describes: the run folder is "
            "inconsistent; retrain this stage"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return meta


def fingerprint(path: Path) -> str:
    """sha256 of a weights file: how a later stage names the exact model it was trained on."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# -- trainer state: model + optimizer + RNG in one file, so they can never disagree --------------


def save_state(path: Path, model, optimizer, step: int, extra: dict) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "param_groups": opt["param_groups"], **extra}
    _guard_disk(
        lambda: write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"json": json.dumps(meta)})), path
    )


def state_meta(path: Path) -> dict:
    """The metadata (step, ...) of a trainer state, from its header: a truncated file is named here, cheaply."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["json"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is damaged ({e}): delete it to restart this stage from scratch") from None


def load_state(path: Path, model, optimizer) -> dict:
    meta = state_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({e}): delete it to restart this stage from scratch") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
