"""Video tokenizer: an ST-ViViT VQ-VAE with a convolutional stem and head.

frames -> conv stem (stride `patch_size`) -> ST-transformer encoder -> FSQ, `codes_per_patch` codes
per position -> ST-transformer decoder -> conv head -> frames. Temporal attention is causal, so the
codes of frame t depend on frames <= t only and frames decode one at a time, in order, in play.

Letters: B batch, T frames, H, W, C pixels, h, w the position grid, N = h*w positions,
G codes per position, Q quantizer channels per code, D width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from procgenie.config import TokenizerConfig
from procgenie.nn.blocks import STTransformer, init_weights, window_mask
from procgenie.nn.quantize import FSQ, VectorQuantizer, usage
from procgenie.nn.stage import StageModel


def to_float(frames_BTHWC: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float in [0, 1]."""
    return frames_BTHWC.float() / 255.0


def from_float(x: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] (any float dtype) -> uint8, rounded, on the same device: to_float's inverse."""
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over frames of per-frame PSNR; x, y (B, T, H, W, C) in [0, 1]."""
    mse = (x.float() - y.float()).pow(2).flatten(2).mean(-1).clamp(min=1e-10)
    return (-10 * mse.log10()).mean()


def conv_stem(c: int, stages: int, dim: int) -> nn.Sequential:
    """(., 3, H, W) -> (., dim, H/2^stages, W/2^stages): a 3x3 conv, then stride-2 convs doubling channels."""
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.GELU()]
    for i in range(stages):
        layers += [nn.Conv2d(c << i, c << (i + 1), 4, stride=2, padding=1), nn.GELU()]
    return nn.Sequential(*layers, nn.Conv2d(c << stages, dim, 1))


def conv_head(c: int, stages: int, dim: int) -> nn.Sequential:
    """The mirror of conv_stem: (., dim, h, w) -> (., 3, h*2^stages, w*2^stages)."""
    layers: list[nn.Module] = [nn.Conv2d(dim, c << stages, 1)]
    for i in reversed(range(stages)):
        layers += [nn.GELU(), nn.ConvTranspose2d(c << (i + 1), c << i, 4, stride=2, padding=1)]
    return nn.Sequential(*layers, nn.GELU(), nn.Conv2d(c, 3, 3, padding=1))


class Tokenizer(StageModel):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.width
        self.grid = cfg.image_size // p  # h = w
        self.tokens = self.grid**2  # N
        stages = p.bit_length() - 1
        if cfg.stem_channels and 2**stages == p:
            self.stem, self.head = conv_stem(cfg.stem_channels, stages, D), conv_head(cfg.stem_channels, stages, D)
        else:  # plain ViT patches
            self.stem = nn.Conv2d(3, D, p, stride=p)
            self.head = nn.ConvTranspose2d(D, 3, p, stride=p)
        self.encoder = STTransformer(D, cfg.enc_depth, cfg.heads, self.tokens)
        self.decoder = STTransformer(D, cfg.dec_depth, cfg.heads, self.tokens)
        G = cfg.codes_per_patch
        if cfg.quantizer == "fsq":
            self.quant = FSQ(cfg.fsq_levels)
        else:
            self.quant = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.commitment)
        Q = self.quant.dim
        self.to_code = nn.Linear(D, G * Q)
        self.from_code = nn.Linear(G * Q, D)
        init_weights(self)
        # Unit-scale quantizer inputs: with the small default, FSQ rounds nearly everything to one code.
        nn.init.normal_(self.to_code.weight, std=D**-0.5)

    @property
    def vocab(self) -> int:
        return self.quant.size

    # -- pieces ---------------------------------------------------------------------------------
    def _encode(self, frames_BTHWC: torch.Tensor):
        return self.quant(self._latent(frames_BTHWC))  # codes (B, T, N, G)

    def _latent(self, frames_BTHWC: torch.Tensor) -> torch.Tensor:
        """The encoder's continuous output (B, T, N, G, Q), before quantization."""
        B, T = frames_BTHWC.shape[:2]
        x = rearrange(to_float(frames_BTHWC) - 0.5, "b t h w c -> (b t) c h w")
        x = rearrange(self.stem(x), "(b t) d h w -> b t (h w) d", b=B)
        x = self.encoder(x, tmask=window_mask(T, self.cfg.seq_len, x.device))
        return rearrange(self.to_code(x), "b t n (g q) -> b t n g q", g=self.cfg.codes_per_patch)

    def _decode(self, zq_BTNGQ: torch.Tensor, caches=None, pos=None, commit=False) -> torch.Tensor:
        B, T = zq_BTNGQ.shape[:2]
        x = self.from_code(rearrange(zq_BTNGQ, "b t n g q -> b t n (g q)"))
        fresh = caches is None or caches[0].k is None  # nothing cached: a whole clip, windowed as in training
        tmask = window_mask(T, self.cfg.seq_len, x.device) if fresh else None
        x = self.decoder(x, tmask=tmask, pos=pos, caches=caches, commit=commit)
        x = rearrange(x, "b t (h w) d -> (b t) d h w", h=self.grid)
        return rearrange(self.head(x) + 0.5, "(b t) c h w -> b t h w c", b=B)  # (B, T, H, W, C) ~[0, 1]

    # -- the model's interface ------------------------------------------------------------------
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        frames = batch["frames"]  # (B, T, H, W, C) uint8
        q = self._encode(frames)
        recon = self._decode(q.z)
        target = to_float(frames)
        mse = F.mse_loss(recon.float(), target)
        metrics = {"mse": mse.detach(), "psnr": psnr(recon.detach().clamp(0, 1), target), **usage(q.codes, self.vocab)}
        return mse + q.loss, metrics

    @torch.no_grad()
    def encode(self, frames_BTHWC: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, C) -> codes int64 (B, T, N, G)."""
        return self._encode(frames_BTHWC).codes

    @torch.no_grad()
    def decode(self, codes_BTNG: torch.Tensor, caches=None, pos=None, commit=False) -> torch.Tensor:
        """codes (B, T, N, G) -> float frames (B, T, H, W, C) in [0, 1]. With caches: frames after the cached ones."""
        return self._decode(self.quant.embed(codes_BTNG), caches, pos, commit).clamp(0, 1)
