"""Building the three models from their configs, and loading and linking the stages of a run.

A dynamics model is only meaningful with the exact tokenizer and LAM it was trained on: its
config.json records their weight fingerprints and shapes, and loading checks them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Links:
    """What the dynamics stage takes from the run's frozen tokenizer and LAM: the shapes that size the dynamics
    model, and the weight fingerprints that tie it to them (stage -> fingerprint; empty for a shape-only link).
    config.json keeps them as {"tokenizer": {vocab, positions, codes_per_position, fsq_levels, fingerprint},
    "lam": {num_actions, fingerprint}}."""

    vocab: int
    positions: int
    codes_per_position: int
    fsq_levels: tuple[int, ...] | None
    num_latent_actions: int
    fingerprints: dict = field(default_factory=dict)

    @classmethod
    def of(cls, tokenizer: Tokenizer, lam: LAM, run_dir: Path | None = None) -> "Links":
        """The links to these models (with their fingerprints in `run_dir`, where given)."""
        fsq = tuple(tokenizer.cfg.fsq_levels) if tokenizer.cfg.quantizer == "fsq" else None
        prints = (
            {}
            if run_dir is None
            else {stage: ckpt.fingerprint(run_dir / stage / "model.safetensors") for stage in ("tokenizer", "lam")}
        )
        return cls(tokenizer.vocab, tokenizer.tokens, tokenizer.cfg.codes_per_patch, fsq, lam.cfg.num_actions, prints)

    def to_json(self) -> dict:
        tok = {
            "vocab": self.vocab,
            "positions": self.positions,
            "codes_per_position": self.codes_per_position,
            "fsq_levels": None if self.fsq_levels is None else list(self.fsq_levels),
        }
        out = {"tokenizer": tok, "lam": {"num_actions": self.num_latent_actions}}
        for stage, fp in self.fingerprints.items():
            out[stage] = {"fingerprint": fp, **out[stage]}
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Links":
        tok, lam = d.get("tokenizer"), d.get("lam")
        if not tok or not lam:
            raise UserError("a dynamics config must name its tokenizer and LAM (links): retrain the dynamics stage")
        fsq = tok.get("fsq_levels")
        return cls(
            tok["vocab"],
            tok["positions"],
            tok["codes_per_position"],
            None if fsq is None else tuple(fsq),
            lam["num_actions"],
            {s: d[s]["fingerprint"] for s in ("tokenizer", "lam") if "fingerprint" in d[s]},
        )


def build(sc: C.StageConfig, links: Links | None = None) -> torch.nn.Module:
    """A freshly initialised model from its config alone (and, for the dynamics model, its links)."""
    if sc.stage == "tokenizer":
        return Tokenizer(sc.model)
    if sc.stage == "lam":
        return LAM(sc.model)
    if links is None:
        raise UserError("a dynamics config must name its tokenizer and LAM (links): retrain the dynamics stage")
    actions = NUM_ACTIONS if sc.model.actions == "real" else links.num_latent_actions
    return Dynamics(sc.model, links.vocab, links.positions, links.codes_per_position, actions, links.fsq_levels)


def load_stage(
    run_dir: Path, stage: str, device: torch.device, folder: str | None = None
) -> tuple[torch.nn.Module, C.StageConfig, dict]:
    """A trained stage in eval mode, rebuilt from RUN/<folder>/config.json and model.safetensors (the folder
    defaults to the stage's name)."""
    folder = folder or stage
    sc, extra = ckpt.read_config(run_dir / folder, stage)
    links = None
    if stage == "dynamics":
        tok = extra.get("links", {}).get("tokenizer")
        if tok and "fsq_levels" not in tok:  # runs before 2026-11-26 did not record them: their tokenizer's has them
            tok_model = ckpt.read_config(run_dir / "tokenizer", "tokenizer")[0].model
            tok["fsq_levels"] = list(tok_model.fsq_levels) if tok_model.quantizer == "fsq" else None
        links = Links.from_json(extra.get("links", {}))
    model = build(sc, links)
    ckpt.load_weights(run_dir / folder / "model.safetensors", model)
    return model.to(device).eval(), sc, extra


def check_links(run_dir: Path, extra: dict) -> None:
    """Refuse a dynamics model whose tokenizer or LAM in this run folder is not the one it was trained on."""
    want = Links.from_json(extra.get("links", {})).fingerprints
    for stage in ("tokenizer", "lam"):
        have = ckpt.fingerprint(run_dir / stage / "model.safetensors")
        if want.get(stage) != have:
            raise UserError(
                f"the dynamics model in {run_dir} was trained with another {stage} (weights "
                f"{want.get(stage)}, found {have}): retrain the dynamics stage, or restore that {stage}"
            )


def check_data(extra: dict, ds, what: str, other: str = "train on this one") -> None:
    """Refuse a dataset of another game or frame size than the one the model (its config's `extra`) learnt."""
    data = extra.get("data", {})
    if data.get("env") and data["env"] != ds.env:
        raise UserError(
            f"the {what} was trained on {data['env']} but {ds.root} holds {ds.env}: use a {data['env']} "
            f"dataset, or {other}"
        )
    if data.get("image_size") and data["image_size"] != ds.image_size:
        raise UserError(
            f"the {what} expects {data['image_size']} px frames but {ds.root} holds {ds.image_size} px: "
            f"use a dataset of {data['image_size']} px frames, or {other}"
        )


def build_for_training(
    stage: str, sc: C.StageConfig, ds, run_dir: Path, device
) -> tuple[torch.nn.Module, Links | None]:
    """The model to train and its links; the dynamics stage gets the run's frozen tokenizer and LAM."""
    image_size = getattr(sc.model, "image_size", ds.image_size)
    if image_size != ds.image_size:
        raise UserError(
            f"{stage} is configured for {image_size} px frames but {ds.root} holds {ds.image_size} px: "
            f"--set image_size={ds.image_size}"
        )
    if stage != "dynamics":
        return build(sc).to(device), None
    tokenizer, _, tok_extra = load_stage(run_dir, "tokenizer", device)
    lam, _, lam_extra = load_stage(run_dir, "lam", device)
    for extra, what in ((tok_extra, "tokenizer"), (lam_extra, "latent action model")):
        check_data(extra, ds, what)
    links = Links.of(tokenizer, lam, run_dir)
    model = build(sc, links).to(device)
    model.attach(tokenizer, lam)
    return model, links


@torch.no_grad()
def action_map(lam: LAM, sampler, device, batches: int = 200) -> dict:
    """How often the LAM infers each latent action over training clips (`latent_counts`), and, where the dataset
    holds real actions, their co-occurrence counts (`counts`: real rows, NUM_ACTIONS, by latent columns)."""
    counts = np.zeros((NUM_ACTIONS, lam.cfg.num_actions), np.int64)
    for step in range(batches):
        b = sampler.batch(10_000_000 + step)  # steps no training run reaches: fresh clips
        latent = lam.infer(b["frames"].to(device)).cpu().numpy().ravel()
        np.add.at(counts, (b["actions"].numpy().ravel(), latent), 1)  # no actions: all in row 0, kept apart below
    real = sampler.ds.has_actions
    return {"counts": counts.tolist() if real else None, "latent_counts": counts.sum(0).tolist()}


def write_action_map(run_dir: Path, lam: LAM, sampler, device) -> None:
    lam.eval()
    write_json_atomic(run_dir / "lam" / "action_map.json", action_map(lam, sampler, device))


def _read_map(run_dir: Path) -> dict:
    path = run_dir / "lam" / "action_map.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_action_map(run_dir: Path) -> np.ndarray | None:
    """The real-by-latent co-occurrence counts, or None (no map written, or a dataset without actions)."""
    counts = _read_map(run_dir).get("counts")
    return None if counts is None else np.array(counts)


def read_latent_usage(run_dir: Path) -> np.ndarray | None:
    """How often the LAM inferred each latent action on its training clips (A,), or None."""
    m = _read_map(run_dir)
    if m.get("latent_counts") is not None:
        return np.array(m["latent_counts"])
    return None if m.get("counts") is None else np.array(m["counts"]).sum(0)
