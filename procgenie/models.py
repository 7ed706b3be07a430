"""Building the three models from their configs, and loading and linking the stages of a run.

A dynamics model is only meaningful with the exact tokenizer and LAM it was trained on: its
config.json records their weight fingerprints and shapes, and loading checks them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from procgenie import checkpoint as ckpt
from procgenie import config as C
from procgenie.atomic import write_json_atomic
from procgenie.errors import UserError
from procgenie.nn.dynamics import Dynamics
from procgenie.nn.lam import LAM
from procgenie.nn.tokenizer import Tokenizer
from procgenie.vocab import NUM_ACTIONS


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build(sc: C.StageConfig, links: dict | None = None) -> torch.nn.Module:
    """A freshly initialised model from its config alone."""
    if sc.stage == "tokenizer":
        return Tokenizer(sc.model)
    if sc.stage == "lam":
        return LAM(sc.model)
    tok, lam = (links or {}).get("tokenizer"), (links or {}).get("lam")
    if not tok or not lam:
        raise UserError("a dynamics config must name its tokenizer and LAM (links): retrain the dynamics stage")
    actions = NUM_ACTIONS if sc.model.actions == "real" else lam["num_actions"]
    return Dynamics(sc.model, tok["vocab"], tok["positions"], tok["codes_per_position"], actions,
                    tok.get("fsq_levels"))


def load_stage(run_dir: Path, stage: str, device: torch.device, folder: str | None = None
               ) -> tuple[torch.nn.Module, C.StageConfig, dict]:
    """A trained stage in eval mode, rebuilt from RUN/<folder>/config.json and model.safetensors (the folder
    defaults to the stage's name)."""
    folder = folder or stage
    sc, extra = ckpt.read_config(run_dir / folder, stage)
    tok = extra.get("links", {}).get("tokenizer")
    if tok and "fsq_levels" not in tok:  # runs before 2026-11-26 did not record them: their tokenizer's config has them
        tok_model = ckpt.read_config(run_dir / "tokenizer", "tokenizer")[0].model
        tok["fsq_levels"] = list(tok_model.fsq_levels) if tok_model.quantizer == "fsq" else None
    model = build(sc, extra.get("links"))
    ckpt.load_weights(run_dir / folder / "model.safetensors", model)
    return model.to(device).eval(), sc, extra


def shape_links(tokenizer: Tokenizer, lam: LAM) -> dict:
    """What a dynamics model's shape depends on: the tokenizer's codes and the LAM's actions."""
    fsq = list(tokenizer.cfg.fsq_levels) if tokenizer.cfg.quantizer == "fsq" else None
    return {"tokenizer": {"vocab": tokenizer.vocab, "positions": tokenizer.tokens,
                          "codes_per_position": tokenizer.cfg.codes_per_patch, "fsq_levels": fsq},
            "lam": {"num_actions": lam.cfg.num_actions}}


def links_of(run_dir: Path, tokenizer: Tokenizer, lam: LAM) -> dict:
    """shape_links and the weight fingerprints of the run's tokenizer and LAM."""
    links = shape_links(tokenizer, lam)
    for stage in ("tokenizer", "lam"):
        links[stage] = {"fingerprint": ckpt.fingerprint(run_dir / stage / "model.safetensors"), **links[stage]}
    return links


def check_links(run_dir: Path, extra: dict) -> None:
    """Refuse a dynamics model whose tokenizer or LAM in this run folder is not the one it was trained on."""
    for stage in ("tokenizer", "lam"):
        want = extra.get("links", {}).get(stage, {}).get("fingerprint")
        have = ckpt.fingerprint(run_dir / stage / "model.safetensors")
        if want != have:
            raise UserError(f"the dynamics model in {run_dir} was trained with another {stage} (weights "
                            f"{want}, found {have}): retrain the dynamics stage, or restore that {stage}")


def check_data(extra: dict, ds, what: str, other: str = "train on this one") -> None:
    """Refuse a dataset of another game or frame size than the one the model (its config's `extra`) learnt."""
    data = extra.get("data", {})
    if data.get("env") and data["env"] != ds.env:
        raise UserError(f"the {what} was trained on {data['env']} but {ds.root} holds {ds.env}: use a {data['env']} "
                        f"dataset, or {other}")
    if data.get("image_size") and data["image_size"] != ds.image_size:
        raise UserError(f"the {what} expects {data['image_size']} px frames but {ds.root} holds {ds.image_size} px: "
                        f"use a dataset of {data['image_size']} px frames, or {other}")


def build_for_training(stage: str, sc: C.StageConfig, ds, run_dir: Path, device) -> tuple[torch.nn.Module, dict]:
    """The model to train and its links; the dynamics stage gets the run's frozen tokenizer and LAM."""
    image_size = getattr(sc.model, "image_size", ds.image_size)
    if image_size != ds.image_size:
        raise UserError(f"{stage} is configured for {image_size} px frames but {ds.root} holds {ds.image_size} px: "
                        f"--set image_size={ds.image_size}")
    if stage != "dynamics":
        return build(sc).to(device), {}
    tokenizer, _, tok_extra = load_stage(run_dir, "tokenizer", device)
    lam, _, lam_extra = load_stage(run_dir, "lam", device)
    for extra, what in ((tok_extra, "tokenizer"), (lam_extra, "latent action model")):
        check_data(extra, ds, what)
    links = links_of(run_dir, tokenizer, lam)
    model = build(sc, links).to(device)
    model.attach(tokenizer, lam)
    return model, links


@torch.no_grad()
def action_map(lam: LAM, sampler, device, batches: int = 200) -> dict:
    """Co-occurrence counts of real (rows, NUM_ACTIONS) and latent (columns) actions over training clips."""
    counts = np.zeros((NUM_ACTIONS, lam.cfg.num_actions), np.int64)
    for step in range(batches):
        b = sampler.batch(10_000_000 + step)  # steps no training run reaches: fresh clips
        latent = lam.infer(b["frames"].to(device)).cpu().numpy().ravel()
        np.add.at(counts, (b["actions"].numpy().ravel(), latent), 1)
    return {"counts": counts.tolist()}


def write_action_map(run_dir: Path, lam: LAM, sampler, device) -> None:
    lam.eval()
    write_json_atomic(run_dir / "lam" / "action_map.json", action_map(lam, sampler, device))


def read_action_map(run_dir: Path) -> np.ndarray | None:
    path = run_dir / "lam" / "action_map.json"
    return np.array(json.loads(path.read_text())["counts"]) if path.exists() else None
