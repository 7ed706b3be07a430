"""Session: an ongoing rollout of a WorldModel, one frame per `step(action)`, with the dynamics model's and
the tokenizer decoder's key/value caches kept between calls. Play, `generate`, eval and bench all step one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from procgenie.errors import UserError
from procgenie.metrics import frame_shift
from procgenie.nn.tokenizer import from_float
from procgenie.nn.warp import next_prior

if TYPE_CHECKING:
    from procgenie.world import WorldModel


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Frames in [0, 1] (any float dtype, any device) -> uint8 numpy."""
    return from_float(x).cpu().numpy()


class Session:
    """An ongoing rollout: context frames in, then one generated frame per `step(action)`.

    dynamics: the model to drive (default the one `generate` uses); context_actions (B, C-1) of its kind, else
    inferred by the LAM (latent) or unknown (real)."""

    def __init__(
        self,
        wm: WorldModel,
        context: np.ndarray,
        steps=None,
        temperature=None,
        seed=None,
        dynamics=None,
        context_actions=None,
    ):
        if steps is not None and steps < 1:  # the one check: eval, play, dream and bench all step a Session
            raise UserError(f"MaskGIT steps (--maskgit-steps) must be at least 1, got {steps}")
        self.wm, self.steps, self.temperature = wm, steps, temperature
        self.dyn = dyn = dynamics or wm.dynamics
        self.generator = torch.Generator(wm.device)
        self.generator.manual_seed(0 if seed is None else int(seed))
        ctx = torch.from_numpy(np.require(context, requirements=["C", "W"])).to(wm.device)  # (B, C, H, W, 3)
        tok = wm.tokenizer
        with torch.no_grad(), wm.compute_precision():
            codes = tok.encode(ctx)  # (B, C, N, G)
            B, C = codes.shape[:2]
            if context_actions is not None:
                between = torch.as_tensor(np.asarray(context_actions), dtype=torch.long, device=wm.device)
            elif dyn.real:
                between = torch.full((B, C - 1), dyn.A, dtype=torch.long, device=wm.device)  # unknown
            else:
                between = wm.lam.infer(ctx) if C > 1 else codes.new_zeros(B, 0)  # (B, C-1)
            first = torch.full((B, 1), dyn.A, dtype=torch.long, device=wm.device)
            moving = frame_shift(ctx[:, -2], ctx[:, -1]) if dyn.velocity and C > 1 else None  # the camera's speed
            self.state = dyn.start(codes, torch.cat([first, between], 1), moving)
            self.dec_caches = tok.decoder.new_caches(tok.cfg.seq_len - 1)
            pos = torch.arange(C, device=wm.device)
            decoded = tok.decode(codes, caches=self.dec_caches, pos=pos, commit=True)  # fills the decoder's cache
        self.last = ctx[:, -1]  # (B, H, W, 3) uint8: what a warp model moves into the next frame's prior
        if dyn.cfg.warp_recon > 0:  # a model trained on decoded priors steps on a decoded one from the first frame
            self.last = from_float(decoded[:, -1])
        self.last_codes = codes[:, -1]  # (B, N, G): the prior of a warp model's frame that does not move
        self.frame_shape = tuple(context.shape[2:])

    @property
    def num_actions(self) -> int:
        """How many actions `step` takes: the latent count, or vocab.NUM_ACTIONS on real actions."""
        return self.dyn.A

    @torch.no_grad()
    def step(self, action_B: torch.Tensor) -> np.ndarray:
        """Take actions (B,) -> the next frames, uint8 (B, H, W, 3)."""
        wm = self.wm
        action_B = action_B.to(wm.device)
        with wm.compute_precision():
            prior = None
            if self.dyn.cfg.warp:  # the last frame moved by the camera's predicted shift
                shift = self.dyn.next_shift(self.state, action_B)
                prior = next_prior(self.dyn, wm.tokenizer, self.last, shift, self.last_codes)
            codes = self.dyn.step(
                self.state,
                action_B,
                steps=self.steps,
                temperature=self.temperature,
                generator=self.generator,
                prior=prior,
            )
            pos = torch.tensor([self.state.t - 1], device=wm.device)  # the frame just generated
            frame = wm.tokenizer.decode(codes[:, None], caches=self.dec_caches, pos=pos, commit=True)[:, 0]
        frame = to_uint8(frame)
        if self.dyn.cfg.warp:  # only a warp model slides the last frame
            self.last, self.last_codes = torch.from_numpy(frame).to(wm.device), codes
        return frame
