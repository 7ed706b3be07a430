"""The vector quantizer under the tokenizer and the latent action model.

Two kinds behind one interface, `forward(z (..., dim)) -> Quantized`:
- FSQ (finite scalar quantization, Mentzer et al. 2023): each of a few channels is bounded and
  rounded to a fixed number of levels; the codebook is their product, never learned, so it cannot
  collapse. Used by the tokenizer.
- VQ: a learned codebook, nearest code by cosine similarity, straight-through gradients, commitment
  loss, and dead-code reset (codes unused for a while are moved onto recent encoder outputs).
  Used by the latent action model, whose tiny codebook (8) collapses easily otherwise.
Both report usage: codes used in the batch and the perplexity of the code histogram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Quantized:
    z: torch.Tensor  # (..., dim) quantized vectors, gradients pass straight through
    codes: torch.Tensor  # (...) int64 code indices
    loss: torch.Tensor  # scalar auxiliary loss (0 for FSQ)


def usage(codes: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Codes used and perplexity (exp of the entropy of the code histogram), as 0-d tensors.

    Fixed shapes and no reads back to Python, so that a compiled training step stays one graph."""
    codes = codes.flatten()
    valid = (codes >= 0) & (codes < size)  # NaN inputs give junk codes
    hist = torch.zeros(size, device=codes.device).index_add_(0, codes.clamp(0, size - 1), valid.float())
    p = hist / hist.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    return {"codes_used": (hist > 0).sum(), "perplexity": entropy.exp()}


class FSQ(nn.Module):
    """Finite scalar quantization to `levels` per channel: codebook size prod(levels)."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        self.levels = tuple(levels)
        self.dim, self.size = len(levels), math.prod(levels)
        L = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("half_l", (L - 1) * (1 - 1e-3) / 2, persistent=False)
        self.register_buffer("offset", (1 - L % 2) * 0.5, persistent=False)  # even levels sit between integers
        self.register_buffer("width", L // 2, persistent=False)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0)
        self.register_buffer("basis", basis, persistent=False)

    def forward(self, z: torch.Tensor) -> Quantized:
        z = z.float()
        shift = torch.atanh((self.offset / self.half_l).clamp(max=0.5))  # z = 0 lands mid-range (2 levels: near it)
        bounded = torch.tanh(z + shift) * self.half_l - self.offset
        q = bounded + (bounded.round() - bounded).detach()  # round, straight-through
        codes = ((q.detach() + self.width).round().long() * self.basis).sum(-1)
        return Quantized(q / self.width, codes, z.new_zeros(()))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(...) code indices -> (..., dim) quantized vectors."""
        digits = (codes[..., None] // self.basis) % torch.tensor(self.levels, device=codes.device)
        return (digits - self.width) / self.width


class VectorQuantizer(nn.Module):
    """Cosine-similarity VQ with straight-through gradients, commitment loss and dead-code reset."""

    NO_DECAY = ("codebook",)

    def __init__(self, size: int, dim: int, commitment: float = 0.25, reset_after: float = 0.1, decay: float = 0.95):
        super().__init__()
        self.size, self.dim, self.commitment = size, dim, commitment
        self.codebook = nn.Parameter(F.normalize(torch.randn(size, dim), dim=-1))
        # EMA (over ~1/(1-decay) = 20 steps) of each code's share of assignments; a code below
        # reset_after / size (a tenth of its fair share) is dead. A slower reset let the 8-action LAM
        # collapse to one action for good within 200 steps (measured).
        self.register_buffer("ema_usage", torch.full((size,), 1.0 / size))
        self.reset_after, self.decay = reset_after, decay

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)[codes]

    def forward(self, z: torch.Tensor, quantize: bool = True) -> Quantized:
        """quantize=False passes z (normalized) through, for a continuous warm-up: the decoder learns to use
        the latent before it is cut down to `size` codes. Every code then counts as unused, so the first
        quantized step moves the codebook onto the encoder's outputs (the dead-code reset)."""
        z = F.normalize(z.float(), dim=-1)
        book = F.normalize(self.codebook.float(), dim=-1)
        codes = (z.reshape(-1, self.dim) @ book.T).argmax(-1).reshape(z.shape[:-1])  # nearest by cosine
        if not quantize:
            if self.training:
                self.ema_usage.zero_()
            return Quantized(z, codes, 0.0 * book.sum())  # the codebook takes part (zero gradient), as DDP requires
        q = book[codes]
        loss = F.mse_loss(q, z.detach()) + self.commitment * F.mse_loss(z, q.detach())
        if self.training:
            self._track_and_reset(z.detach(), codes)
        return Quantized(z + (q - z).detach(), codes, loss)

    @torch.no_grad()
    def _track_and_reset(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        counts = torch.bincount(codes.flatten(), minlength=self.size).float()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        self.ema_usage.mul_(self.decay).add_(counts / counts.sum(), alpha=1 - self.decay)
        dead = self.ema_usage < self.reset_after / self.size
        if dead.any():
            # Move dead codes onto random encoder outputs of the whole global batch (rank 0's choice,
            # broadcast), so any number of ranks resets like one process would.
            flat = z.reshape(-1, self.dim)
            if distributed:
                parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, flat.contiguous())
                flat = torch.cat(parts)
            pick = torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)
            self.codebook.data[dead] = flat[pick] + 0.01 * torch.randn_like(flat[pick])
            self.ema_usage[dead] = 1.0 / self.size
            if distributed:
                dist.broadcast(self.codebook.data, 0)
