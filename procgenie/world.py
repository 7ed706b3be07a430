"""WorldModel: the three trained stages behind one small numpy-in, numpy-out API (SPEC's Python API).

    wm = WorldModel.from_pretrained()             # the bundled model, or from_pretrained("runs/x")
    frames = wm.generate(context, actions)        # uint8 (B, C, 64, 64, 3), int64 (B, H) -> (B, H, ...)

`Session` (procgenie/session.py) is the incremental form that play uses: one frame per call, with the
dynamics and tokenizer-decoder key/value caches kept between calls.

Letters: B batch, C context frames, H generated frames, N positions, G codes per position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from procgenie import checkpoint as ckpt
from procgenie.errors import UserError
from procgenie.models import check_links, load_stage, pick_device, read_action_map, read_latent_usage
from procgenie.precision import autocast, resolve
from procgenie.session import Session, to_uint8
from procgenie.vocab import NOOP, NUM_ACTIONS, PROCGEN_GAMES, most_specific_latent, real_for_latent


def _frames_in(frames, size: int, name: str, min_t: int = 1) -> torch.Tensor:
    a = np.asarray(frames)
    if a.dtype != np.uint8 or a.ndim != 5 or a.shape[2:] != (size, size, 3) or a.shape[1] < min_t:
        raise UserError(f"{name} must be uint8 (B, T>={min_t}, {size}, {size}, 3), got {a.dtype} {a.shape}")
    return torch.from_numpy(np.require(a, requirements=["C", "W"]))


PLAY_MASKGIT_STEPS = 2  # at most this many MaskGIT rounds per played frame for a model that samples its codes
DYNAMICS_FOLDERS = {"latent": "dynamics", "real": "dynamics-real"}


class WorldModel:
    """A tokenizer, latent action model and dynamics model(s) that were trained together.

    A run holds a dynamics model on latent actions (Genie's, RUN/dynamics), one on Procgen's real actions
    (RUN/dynamics-real), or both. `generate` drives the one `actions` names (default: the latent one where
    there is one); `play` drives the one a player's keys steer best: the real one where there is one."""

    def __init__(self, run_dir: Path, device=None, precision: str = "auto", actions: str | None = None):
        self.run_dir = Path(run_dir)
        self.device = pick_device(device)
        self.tokenizer, self.tok_cfg, self.tok_extra = load_stage(self.run_dir, "tokenizer", self.device)
        self.lam, self.lam_cfg, _ = load_stage(self.run_dir, "lam", self.device)
        self._dynamics = {}  # kind -> (model, config)
        for kind, folder in DYNAMICS_FOLDERS.items():
            if (self.run_dir / folder / "config.json").exists():
                model, sc, extra = load_stage(self.run_dir, "dynamics", self.device, folder)
                check_links(self.run_dir, extra)
                self._dynamics[kind] = (model, sc)
        if not self._dynamics:
            raise UserError(
                f"{self.run_dir} has no trained dynamics model: train it with `procgenie train dynamics "
                f"--data DIR --run {self.run_dir}`"
            )
        if actions is not None and actions not in self._dynamics:
            raise UserError(
                f"{self.run_dir} has no dynamics model on {actions} actions (no "
                f"{DYNAMICS_FOLDERS.get(actions, actions)}/): choose one of {', '.join(self._dynamics)}"
            )
        kind = actions or ("latent" if "latent" in self._dynamics else "real")
        self.dynamics, self.dyn_cfg = self._dynamics[kind]
        self.play_kind = "real" if "real" in self._dynamics else "latent"
        self.play_dynamics, self.play_cfg = self._dynamics[self.play_kind]
        self.image_size = self.tok_cfg.model.image_size
        data = self.tok_extra.get("data", {})
        self.env = data.get("env", "coinrun")
        # A world learned from Procgen play (levels to start from, keys to press), or from recordings without
        # actions (`data import`): those start from their dataset's test recordings and take latent actions only.
        self.procgen = self.env in PROCGEN_GAMES and data.get("actions", True)
        self.data_path = data.get("path")
        self.precision = resolve(precision, self.device)  # 'bf16' or 'fp32': what this device computes faster
        counts = read_action_map(self.run_dir)
        self._action_map = None if counts is None else most_specific_latent(counts)
        self._latent_to_real = None if counts is None else real_for_latent(counts)
        usage = read_latent_usage(self.run_dir)
        # The latent a player gets with no key held: no-op's where keys map to latents, else the LAM's most
        # frequent one (what usually happens next in the recordings).
        self.idle_latent = (
            int(self._action_map[NOOP])
            if self._action_map is not None
            else int(np.argmax(usage))
            if usage is not None
            else 0
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, device=None, precision: str = "auto", actions: str | None = None
    ) -> "WorldModel":
        """The run at `path` (default: the bundled model). precision: 'auto' (bf16 only where this device
        computes it faster than fp32), 'bf16' or 'fp32'. actions: which dynamics model `generate` drives,
        'latent' or 'real' (default: latent where the run has it)."""
        return cls(ckpt.resolve_run(path), device, precision, actions)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def num_latent_actions(self) -> int:
        return self.lam_cfg.model.num_actions

    @property
    def action_kind(self) -> str:
        """What `generate` takes: 'latent' (Genie's latent actions) or 'real' (Procgen's actions 0..14)."""
        return self.dyn_cfg.model.actions

    @property
    def num_actions(self) -> int:
        """How many actions `generate` takes: the latent count, or Procgen's (vocab.NUM_ACTIONS)."""
        return self.dynamics.A

    def play_steps(self, asked: int | None = None) -> int:
        """MaskGIT rounds per played frame: `asked`, else one for a model that picks codes by expected level
        (decode='mean'), else the smaller of PLAY_MASKGIT_STEPS and the model's own.

        Expected-level codes need no second round: on the bundled model one round scored as well as two on the
        test split at about 1.5 times the frame rate (docs/benchmarks.md). A sampling model's single round would
        draw every code at once, so it keeps two."""
        if asked is not None:
            return asked
        m = self.play_cfg.model
        return 1 if m.decode == "mean" else min(PLAY_MASKGIT_STEPS, m.maskgit_steps)

    def compute_precision(self):
        """The context that runs this model's computations in its precision (bf16 autocast or none)."""
        return autocast(self.device, self.precision)

    def fast_weights(self) -> "WorldModel":
        """Keep the tokenizer's and dynamics models' matrices in bf16 (where it computes in bf16): autocast
        otherwise casts every weight at every call, a seventh of play's time per frame on a CPU. Norms,
        embeddings and buffers stay float32, and the results do not change (autocast rounds the weights to the
        same bf16 values). The tokenizer's conv head goes channels-last, the layout its input arrives in (a
        quarter of the head's time on a CPU). Play and `bench` use this; eval does not. Returns self."""
        self.tokenizer.head.to(memory_format=torch.channels_last)
        if self.bf16:
            for model in (self.tokenizer, *(m for m, _ in self._dynamics.values())):
                for m in model.modules():
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                        m.to(torch.bfloat16)
        return self

    # -- SPEC's API -------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, frames) -> np.ndarray:
        """uint8 (B, T, H, W, 3) -> uint8, same shape: the tokenizer's round trip."""
        x = _frames_in(frames, self.image_size, "frames")
        return self._chunked(lambda c: to_uint8(self.tokenizer.decode(self.tokenizer.encode(c))), x)

    @torch.no_grad()
    def encode(self, frames) -> np.ndarray:
        """uint8 (B, T, H, W, 3) -> int64 (B, T, N, G): the tokenizer's codes, G per patch position, each in
        0..codebook_size-1."""
        x = _frames_in(frames, self.image_size, "frames")
        return self._chunked(lambda c: self.tokenizer.encode(c).cpu().numpy(), x)

    @property
    def codebook_size(self) -> int:
        return int(self.tokenizer.vocab)

    @torch.no_grad()
    def infer_actions(self, frames) -> np.ndarray:
        """uint8 (B, T, H, W, 3) -> int64 (B, T-1): the latent action of each transition."""
        x = _frames_in(frames, self.image_size, "frames", min_t=2)
        return self._chunked(lambda c: self.lam.infer(c).cpu().numpy(), x)

    @torch.no_grad()
    def lam_next_frames(self, frames, actions) -> np.ndarray:
        """The LAM decoder's own predictions: frames uint8 (B, T, H, W, 3) and latent actions int64 (B, T) ->
        uint8 (B, T, H, W, 3), the frame after each (what the LAM learns its latents by)."""
        x = _frames_in(frames, self.image_size, "frames")
        a = torch.from_numpy(self._actions_in(actions, "latent actions", self.num_latent_actions, x.shape[0]))
        if a.shape[1] != x.shape[1]:
            raise UserError(f"lam_next_frames takes one latent action per frame, got {a.shape[1]} for {x.shape[1]}")
        return self._chunked(lambda c, ac: to_uint8(self.lam.predict(c, ac)), x, a)

    def _chunked(self, fn, *tensors: torch.Tensor, size: int = 16) -> np.ndarray:
        """fn over batches of `size` clips, moved to the device and under this model's autocast; bounds memory."""
        outs = []
        with self.compute_precision():
            for i in range(0, len(tensors[0]), size):
                outs.append(fn(*(t[i : i + size].to(self.device) for t in tensors)))
        return np.concatenate(outs)

    @torch.no_grad()
    def generate(
        self,
        context,
        actions,
        steps: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        context_actions=None,
    ) -> np.ndarray:
        """The H frames that follow `context` (uint8 (B, C, H, W, 3)) under `actions` (int64 (B, H)) of
        `action_kind`: latent actions, or Procgen's actions 0..14 for a model on real actions.

        context_actions (int (B, C-1)): the actions between the context frames, of the same kind. Default: the
        latent actions the LAM infers from them, or, for a model on real actions, 'unknown' (trained for: a
        share of training frames had their action dropped). steps: MaskGIT rounds per frame; temperature: sample
        codes at it (0: greedy); both default to the dynamics config, whose `decode` may pick each code as its
        channels' expected levels instead."""
        ctx = _frames_in(context, self.image_size, "context")
        acts = self._actions_in(actions, f"{self.action_kind} actions", self.num_actions, ctx.shape[0])
        if context_actions is not None:
            context_actions = self._context_in(context_actions, self.num_actions, ctx)
        return self._run(
            Session(
                self, ctx.numpy(), steps=steps, temperature=temperature, seed=seed, context_actions=context_actions
            ),
            acts,
        )

    @torch.no_grad()
    def play(
        self, context, keys, seed: int | None = None, context_keys=None, steps: int | None = None, progress=None
    ) -> np.ndarray:
        """What `procgenie play` shows for Procgen key presses: context uint8 (B, C, H, W, 3), keys int64 (B, H)
        of actions 0..14 (one per frame) -> uint8 (B, H, H, W, 3).

        The keys go to the dynamics model on real actions where the run has one, else each becomes the latent
        action that `latent_for_real_action` gives. context_keys (int (B, C-1)): the keys that led from one
        context frame to the next (play starts from frames under no-op); default unknown (a latent model infers
        them from the frames). steps: MaskGIT rounds per frame, default play's own (`play_steps`). progress: a
        progress bar's label, for long rollouts."""
        ctx = _frames_in(context, self.image_size, "context")
        keys = self._actions_in(keys, "keys", NUM_ACTIONS, ctx.shape[0])
        if context_keys is not None:
            context_keys = self._context_in(context_keys, NUM_ACTIONS, ctx)
        if self.play_kind == "latent":
            keys = np.array([self.latent_for_real_action(a) for a in range(NUM_ACTIONS)])[keys]
        return self._run(self.play_session(ctx.numpy(), context_keys, steps, seed), keys, progress)

    @property
    def has_key_map(self) -> bool:
        """Whether Procgen keys map to latent actions (the LAM's training data held real actions)."""
        return self._action_map is not None

    def key_for_latent(self, latent: int) -> int:
        """The Procgen action (0..8) that the training data shows most often with this latent action."""
        if self._latent_to_real is None:
            raise UserError(
                f"{self.run_dir} has no map between keys and latent actions (its data held no actions, "
                "or lam/action_map.json is missing)"
            )
        return int(self._latent_to_real[int(latent)])

    def latent_for_real_action(self, real_action: int) -> int:
        """The latent action that the training data shows most often with this Procgen action (0..14)."""
        if not 0 <= int(real_action) < NUM_ACTIONS:
            raise UserError(f"a Procgen action lies in 0..{NUM_ACTIONS - 1}, got {real_action}")
        if self._action_map is None:
            raise UserError(
                f"{self.run_dir} has no map from keys to latent actions (its data held no actions, or "
                "lam/action_map.json is missing): give latent actions 0..K-1"
            )
        return int(self._action_map[int(real_action)])

    # -- shared -----------------------------------------------------------------------------------
    @staticmethod
    def _actions_in(actions, name: str, count: int, batch: int) -> np.ndarray:
        a = np.asarray(actions)
        if a.ndim != 2 or a.shape[0] != batch or not np.issubdtype(a.dtype, np.integer):
            raise UserError(f"{name} must be int (B={batch}, H), got {a.dtype} {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= count):
            raise UserError(f"{name} must lie in 0..{count - 1}")
        return a.astype(np.int64)

    @staticmethod
    def _context_in(actions, count: int, ctx: torch.Tensor) -> np.ndarray:
        a = WorldModel._actions_in(actions, "context actions", count, ctx.shape[0])
        if a.shape[1] != ctx.shape[1] - 1:
            raise UserError(
                f"context actions must be the C-1={ctx.shape[1] - 1} actions between the context "
                f"frames, got {a.shape[1]}"
            )
        return a

    @staticmethod
    def _run(session: Session, actions: np.ndarray, progress=None) -> np.ndarray:
        frames = tqdm(range(actions.shape[1]), desc=progress, disable=progress is None, leave=False, dynamic_ncols=True)
        out = [session.step(torch.from_numpy(actions[:, h])) for h in frames]
        B, (S, _, ch) = actions.shape[0], session.frame_shape
        return np.stack(out, 1) if out else np.zeros((B, 0, S, S, ch), np.uint8)

    def play_session(self, context: np.ndarray, context_keys=None, steps: int | None = None, seed=None) -> Session:
        """The incremental form of `play` that the server steps one frame at a time: with Procgen actions
        (B,) where `play_kind` is 'real', else with latent actions."""
        return Session(
            self,
            context,
            steps=self.play_steps(steps),
            seed=seed,
            dynamics=self.play_dynamics,
            context_actions=context_keys if self.play_kind == "real" else None,
        )
