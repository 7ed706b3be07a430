"""Latent action model: which of a few discrete actions explains each transition, learned from pixels.

The encoder reads frames x_1..x_T with causal temporal attention; a learned action token per frame
collects, at frame t+1, what changed since frame t, and a VQ with `num_actions` codes makes it the
latent action a_t. The decoder sees only x_1..x_t and a_t and must rebuild x_{t+1}, so a_t has to
carry the change. The model never sees the real actions.

Letters: B batch, T frames, N patches per frame, P pixels per patch, D width, A latent actions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat

from procgenie.config import LAMConfig
from procgenie.nn.blocks import STTransformer, init_weights, patchify, unpatchify, window_mask
from procgenie.nn.quantize import Quantized, VectorQuantizer, usage
from procgenie.nn.stage import StageModel
from procgenie.nn.tokenizer import psnr, to_float


class LAM(StageModel):
    def __init__(self, cfg: LAMConfig):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.width
        self.tokens = (cfg.image_size // p) ** 2  # N
        # The encoder sees each frame and its change since the last one: actions are about motion.
        self.embed_enc = nn.Linear(p * p * 3 * (1 + cfg.motion_input), D)
        self.embed = nn.Linear(p * p * 3, D)
        self.action_query = nn.Parameter(torch.randn(D) * 0.02)
        self.encoder = STTransformer(D, cfg.enc_depth, cfg.heads, self.tokens + 1)
        self.to_code = nn.Linear(D, cfg.code_dim)
        self.vq = VectorQuantizer(cfg.num_actions, cfg.code_dim, cfg.commitment)
        self.quantizing = True  # False during the continuous warm-up (set_step)
        self.from_code = nn.Linear(cfg.code_dim, D)
        self.token_cond = cfg.action_cond == "token"
        self.decoder = STTransformer(D, cfg.dec_depth, cfg.heads, self.tokens + self.token_cond)
        self.to_pixels = nn.Linear(D, p * p * 3)
        init_weights(self)
        nn.init.zeros_(self.to_pixels.weight)  # start as "next frame = this frame"

    def _pixels(self, frames_BTHWC):
        return patchify(to_float(frames_BTHWC) - 0.5, self.cfg.patch_size)  # (B, T, N, P), centred

    def _infer(self, frames_BTHWC) -> Quantized:
        """Latent actions of the T-1 transitions: codes (B, T-1)."""
        f = self._pixels(frames_BTHWC)
        if self.cfg.motion_input:
            prev = torch.cat([f[:, :1], f[:, :-1]], 1)  # frame 0 counts as unchanged
            f = torch.cat([f, f - prev], -1)
        x = self.embed_enc(f)
        B, T = x.shape[:2]
        q = repeat(self.action_query, "d -> b t 1 d", b=B, t=T)
        h = self.encoder(torch.cat([q, x], 2), tmask=window_mask(T, self.cfg.seq_len, x.device))
        # frame t+1's action token has seen x_{<=t+1}
        return self.vq(self.to_code(h[:, 1:, 0]), quantize=self.quantizing or not self.training)

    def _predict(self, frames_BTHWC, z_BTC) -> torch.Tensor:
        """Given frames x_1..x_t (B, T, ...) and action vectors a_1..a_t (B, T, C): x_2..x_{t+1} in [0, 1]."""
        x = self.embed(self._pixels(frames_BTHWC))
        a = self.from_code(z_BTC)[:, :, None]  # (B, T, 1, D)
        x = torch.cat([a, x], 2) if self.token_cond else x + a
        h = self.decoder(x, tmask=window_mask(x.shape[1], self.cfg.seq_len, x.device))
        delta = unpatchify(self.to_pixels(h[:, :, -self.tokens :]), self.cfg.patch_size, self.cfg.image_size)
        return to_float(frames_BTHWC) + delta  # predicted as a change of the last frame

    def set_step(self, step: int, total: int) -> None:
        """Continuous action latents for the first continuous_frac of the steps, then quantized ones."""
        self.quantizing = step >= self.cfg.continuous_frac * total

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        frames = batch["frames"]  # (B, T, H, W, C) uint8
        q = self._infer(frames)
        pred = self._predict(frames[:, :-1], q.z)
        target = to_float(frames[:, 1:])
        mse = F.mse_loss(pred.float(), target)
        return mse + q.loss, {
            "mse": mse.detach(),
            "psnr": psnr(pred.detach().clamp(0, 1), target),
            **usage(q.codes, self.cfg.num_actions),
        }

    @torch.no_grad()
    def infer(self, frames_BTHWC: torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, T, H, W, C) -> latent actions int64 (B, T-1); action t leads frame t to t+1."""
        return self._infer(frames_BTHWC).codes

    @torch.no_grad()
    def predict(self, frames_BTHWC: torch.Tensor, actions_BT: torch.Tensor) -> torch.Tensor:
        """Frames x_1..x_t and latent actions a_1..a_t (B, T) -> predicted x_2..x_{t+1}, float in [0, 1]."""
        return self._predict(frames_BTHWC, self.vq.embed(actions_BT)).clamp(0, 1)
