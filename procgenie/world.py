"""WorldModel: the three trained stages behind one small numpy-in, numpy-out API (SPEC's Python API).

    wm = WorldModel.from_pretrained()             # the bundled model, or from_pretrained("runs/x")
    frames = wm.generate(context, actions)        # uint8 (B, C, 64, 64, 3), int64 (B, H) -> (B, H, ...)

`Session` is the incremental form that play uses: one frame per call, with the dynamics and
tokenizer-decoder key/value caches kept between calls.

Letters: B batch, C context frames, H generated frames, N positions, G codes per position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from procgenie import checkpoint as ckpt
from procgenie.errors import UserError
from procgenie.models import check_links, load_stage, pick_device, read_action_map
from procgenie.precision import autocast, resolve


def _frames_in(frames, size: int, name: str, min_t: int = 1) -> torch.Tensor:
    a = np.asarray(frames)
    if a.dtype != np.uint8 or a.ndim != 5 or a.shape[2:] != (size, size, 3) or a.shape[1] < min_t:
        raise UserError(f"{name} must be uint8 (B, T>={min_t}, {size}, {size}, 3), got {a.dtype} {a.shape}")
    return torch.from_numpy(np.require(a, requirements=["C", "W"]))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def most_specific_latent(counts_RA: np.ndarray) -> np.ndarray:
    """For each real action (rows of the co-occurrence counts), the latent action most over-represented
    with it: argmax of P(latent | real) / P(latent). A plain argmax of the counts would give the most
    common latent (the one for "keep moving as before") to nearly every real action."""
    counts = counts_RA.astype(np.float64)
    p_latent = counts.sum(0) / max(counts.sum(), 1)
    p_given_real = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    return (p_given_real / np.clip(p_latent, 1e-12, None)).argmax(1)


class WorldModel:
    """A tokenizer, latent action model and dynamics model that were trained together."""

    def __init__(self, run_dir: Path, device=None, precision: str = "auto"):
        self.run_dir = Path(run_dir)
        self.device = pick_device(device)
        self.tokenizer, self.tok_cfg, self.tok_extra = load_stage(self.run_dir, "tokenizer", self.device)
        self.lam, self.lam_cfg, _ = load_stage(self.run_dir, "lam", self.device)
        self.dynamics, self.dyn_cfg, dyn_extra = load_stage(self.run_dir, "dynamics", self.device)
        check_links(self.run_dir, dyn_extra)
        self.image_size = self.tok_cfg.model.image_size
        self.env = self.tok_extra.get("data", {}).get("env", "coinrun")
        self.precision = resolve(precision, self.device)  # 'bf16' or 'fp32': what this device computes faster
        counts = read_action_map(self.run_dir)
        self._action_map = None if counts is None else most_specific_latent(counts)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device=None, precision: str = "auto") -> "WorldModel":
        """The run at `path` (default: the bundled model). precision: 'auto' (bf16 only where this device
        computes it faster than fp32), 'bf16' or 'fp32'."""
        return cls(ckpt.resolve_run(path), device, precision)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def num_latent_actions(self) -> int:
        return self.lam_cfg.model.num_actions

    def _autocast(self):
        return autocast(self.device, self.precision)

    def fast_weights(self) -> "WorldModel":
        """Keep the tokenizer's and dynamics model's matrices in bf16 (where it computes in bf16): autocast
        otherwise casts every weight at every call, a seventh of play's time per frame on a CPU. Norms,
        embeddings and buffers stay float32. Play and `bench` use this; eval does not. Returns self."""
        if self.bf16:
            for model in (self.tokenizer, self.dynamics):
                for m in model.modules():
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                        m.to(torch.bfloat16)
        return self

    # -- SPEC's API -------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, frames) -> np.ndarray:
        """uint8 (B, T, H, W, 3) -> uint8, same shape: the tokenizer's round trip."""
        x = _frames_in(frames, self.image_size, "frames").to(self.device)
        with self._autocast():
            return _to_uint8(self.tokenizer.decode(self.tokenizer.encode(x)))

    @torch.no_grad()
    def infer_actions(self, frames) -> np.ndarray:
        """uint8 (B, T, H, W, 3) -> int64 (B, T-1): the latent action of each transition."""
        x = _frames_in(frames, self.image_size, "frames", min_t=2).to(self.device)
        with self._autocast():
            return self.lam.infer(x).cpu().numpy()

    @torch.no_grad()
    def generate(self, context, actions, steps: int | None = None, temperature: float | None = None,
                 seed: int | None = None) -> np.ndarray:
        """The H frames that follow `context` (uint8 (B, C, H, W, 3)) under latent `actions` (int64 (B, H)).

        steps: MaskGIT rounds per frame; temperature: sample codes at it (0: greedy); both default to the
        dynamics config, whose `decode` may pick each code as its channels' expected levels instead."""
        ctx = _frames_in(context, self.image_size, "context")
        acts = np.asarray(actions)
        if acts.ndim != 2 or acts.shape[0] != ctx.shape[0] or not np.issubdtype(acts.dtype, np.integer):
            raise UserError(f"actions must be int (B={ctx.shape[0]}, H), got {acts.dtype} {acts.shape}")
        if acts.size and (acts.min() < 0 or acts.max() >= self.num_latent_actions):
            raise UserError(f"latent actions must lie in 0..{self.num_latent_actions - 1}")
        session = Session(self, ctx.numpy(), steps=steps, temperature=temperature, seed=seed)
        out = [session.step(torch.from_numpy(acts[:, h]).long()) for h in range(acts.shape[1])]
        return np.stack(out, 1) if out else np.zeros((ctx.shape[0], 0, *ctx.shape[2:]), np.uint8)

    def latent_for_real_action(self, real_action: int) -> int:
        """The latent action that the training data shows most often with this Procgen action (0..14)."""
        if not 0 <= int(real_action) < 15:
            raise UserError(f"a Procgen action lies in 0..14, got {real_action}")
        if self._action_map is None:
            raise UserError(f"{self.run_dir}/lam has no action_map.json: retrain the lam stage to write it")
        return int(self._action_map[int(real_action)])


class Session:
    """An ongoing rollout: context frames in, then one generated frame per `step(action)`."""

    def __init__(self, wm: WorldModel, context: np.ndarray, steps=None, temperature=None, seed=None):
        self.wm, self.steps, self.temperature = wm, steps, temperature
        self.generator = torch.Generator(wm.device)
        self.generator.manual_seed(0 if seed is None else int(seed))
        ctx = torch.from_numpy(np.ascontiguousarray(context)).to(wm.device)       # (B, C, H, W, 3)
        tok, dyn = wm.tokenizer, wm.dynamics
        with torch.no_grad(), wm._autocast():
            codes = tok.encode(ctx)                                                # (B, C, N, G)
            B, C = codes.shape[:2]
            lat = wm.lam.infer(ctx) if C > 1 else codes.new_zeros(B, 0)          # (B, C-1)
            first = torch.full((B, 1), dyn.A, dtype=torch.long, device=wm.device)
            self.state = dyn.start(codes, torch.cat([first, lat], 1))
            self.dec_caches = tok.decoder.new_caches(tok.cfg.seq_len - 1)
            pos = torch.arange(C, device=wm.device)
            tok.decode(codes, caches=self.dec_caches, pos=pos, commit=True)    # fill the decoder's cache
        self.t = C

    @torch.no_grad()
    def step(self, action_B: torch.Tensor) -> np.ndarray:
        """Take latent actions (B,) -> the next frames, uint8 (B, H, W, 3)."""
        wm = self.wm
        with wm._autocast():
            codes = wm.dynamics.step(self.state, action_B.to(wm.device), steps=self.steps,
                                     temperature=self.temperature, generator=self.generator)
            pos = torch.tensor([self.t], device=wm.device)
            frame = wm.tokenizer.decode(codes[:, None], caches=self.dec_caches, pos=pos, commit=True)[:, 0]
        self.t += 1
        return _to_uint8(frame)
