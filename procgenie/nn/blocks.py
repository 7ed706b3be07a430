"""The blocks that all three models share: patches, rotary time, and the ST-transformer.

An ST-transformer block attends inside a frame (spatial, over N tokens), then across frames at each
token position (temporal, causal), then applies an MLP: Genie's memory-efficient alternative to
full space-time attention. Temporal attention uses rotary positions, so a key/value cache of past
frames never needs recomputing when the context window slides.

Letters: B batch, T frames, N tokens per frame, D width, H heads, K head size, S cached frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


def patchify(x_BTHWC: torch.Tensor, p: int) -> torch.Tensor:
    """(B, T, H, W, C) -> (B, T, N, p*p*C) with N = (H/p)*(W/p), row-major patches."""
    return rearrange(x_BTHWC, "b t (h p1) (w p2) c -> b t (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(x_BTNP: torch.Tensor, p: int, side: int) -> torch.Tensor:
    """(B, T, N, p*p*C) -> (B, T, H, W, C), the inverse of patchify for a square frame of `side` px."""
    return rearrange(x_BTNP, "b t (h w) (p1 p2 c) -> b t (h p1) (w p2) c", h=side // p, p1=p, p2=p)


def rotary(pos: torch.Tensor, dim: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (len(pos), dim) at integer positions `pos`: the cosines of each pair's angle, twice, and
    its sines, negated for the first half (the form apply_rotary takes in four element-wise operations)."""
    inv = base ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels (i, i + K/2) of x (..., L, K) by position; cos, sin are rotary's (L, K):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with the halves swapped by a roll.

    On a GPU in x's own dtype (bf16 under autocast): there these element-wise passes over q and k are
    memory-bound, and in float32 they moved three times the bytes. On a CPU in float32, as the bundled
    model was trained (bf16 was no faster there).
    """
    dtype = x.dtype
    if x.is_cuda:
        cos, sin = cos.to(dtype), sin.to(dtype)
    else:
        x = x.float()
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * sin).to(dtype)


def attend(q, k, v, mask=None, causal=False):
    """softmax(q k^T / sqrt(K)) v over (..., L, K) with an optional bool mask (True = may attend).

    Long sequences go to scaled_dot_product_attention (flash kernels). Short ones, the many tiny
    sequences of an ST-transformer (64 positions, or 16 frames), run as plain matmuls on CPUs in training,
    where they are several times faster forward and backward, and under torch.compile on GPUs, which fuses
    the mask and softmax (docs/benchmarks.md). Eager GPU code and inference (no gradients: play, eval) keep
    the single SDPA kernel, which is faster there (spatial attention of one frame 62 against 109 us, the
    temporal attention of play's new frame 123 against 181 us, on a 2-core CPU).
    """
    Lq, Lk = q.shape[-2], k.shape[-2]
    sdpa = (q.is_cuda and not torch.compiler.is_compiling()) or not torch.is_grad_enabled()
    if Lq * Lk > 128 * 128 or sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    a = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None and causal:
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    if mask is not None:
        a = a.masked_fill(~mask, float("-inf"))
    return a.float().softmax(-1).to(v.dtype) @ v


@dataclass
class KVCache:
    """Temporal keys and values of past frames for one block: (B*N, H, S, K) each, and their positions."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # (S,) int
    max_len: int = 16

    def keep_last(self, n: int) -> None:
        """Forget all but the last n cached frames."""
        if self.k is not None:
            start = max(0, self.k.shape[2] - n)
            self.k, self.v, self.pos = self.k[:, :, start:], self.v[:, :, start:], self.pos[start:]

    def append(self, k, v, pos) -> None:
        """Add frames' keys and values (B*N, H, L, K) at positions (L,), keeping every frame for now."""
        if self.k is None:
            self.k, self.v, self.pos = k, v, pos
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.pos = torch.cat([self.pos, pos])

    def extend(self, k, v, pos) -> None:
        self.append(k, v, pos)
        self.keep_last(self.max_len)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (flash kernels where available)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x_BLD, mask=None, causal=False, rope=None, cache: KVCache | None = None, commit: bool = False, pos=None
    ):
        q, k, v = rearrange(self.qkv(x_BLD), "b l (three h k) -> three b h l k", three=3, h=self.heads)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        L = q.shape[2]
        if cache is not None and cache.k is not None:
            # New frames attend every cached frame, and each other causally (one new frame: all of them).
            S = cache.k.shape[2]
            mask = None if L == 1 else torch.ones(L, S + L, dtype=torch.bool, device=q.device).tril(S)
            if commit is True:  # every new frame joins: the cache, grown by them, is what they attend
                cache.append(k, v, pos)
                y = attend(q, cache.k, cache.v, mask=mask)
                cache.keep_last(cache.max_len)
                commit = False
            else:
                y = attend(q, torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2), mask=mask)
        else:
            y = attend(q, k, v, mask=mask, causal=causal)
        if cache is not None and commit:
            n = L if commit is True else commit
            cache.extend(k[:, :, :n], v[:, :, :n], pos[:n])
        return self.proj(rearrange(y, "b h l k -> b l (h k)"))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class STBlock(nn.Module):
    """Spatial attention within each frame, causal temporal attention per token position, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_s, self.spatial = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_t, self.temporal = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_m, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x_BTND, tmask=None, rope=None, cache=None, commit=False, pos=None):
        B, T, N, D = x_BTND.shape
        x = rearrange(x_BTND, "b t n d -> (b t) n d")
        x = x + self.spatial(self.norm_s(x))
        x = rearrange(x, "(b t) n d -> (b n) t d", b=B)
        x = x + self.temporal(self.norm_t(x), mask=tmask, causal=True, rope=rope, cache=cache, commit=commit, pos=pos)
        x = x + self.mlp(self.norm_m(x))
        return rearrange(x, "(b n) t d -> b t n d", b=B)


class STTransformer(nn.Module):
    """A stack of ST blocks with learned spatial positions, rotary temporal positions and a final norm.

    forward(x (B, T, N, D)) -> (B, T, N, D). `tmask` (T, T) bool replaces the causal temporal mask
    (True = may attend). With `caches`, x holds new frames at temporal positions `pos` that attend
    the cached past; `commit` appends their keys and values to the caches (True: every new frame's; an
    int n: the first n frames', the rest only attend).
    """

    NO_DECAY = ("pos_s",)

    def __init__(self, dim: int, depth: int, heads: int, tokens: int, act_ckpt: bool = False):
        super().__init__()
        # Inputs arrive at any scale (a conv stem, summed embeddings): normalise them, or the blocks'
        # first updates swamp the signal and training stalls at the mean frame.
        self.norm_in = nn.LayerNorm(dim)
        self.pos_s = nn.Parameter(torch.randn(tokens, dim) * 0.02)  # (N, D)
        self.blocks = nn.ModuleList(STBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head_dim, self.act_ckpt = dim // heads, act_ckpt

    def new_caches(self, max_len: int) -> list[KVCache]:
        return [KVCache(max_len=max_len) for _ in self.blocks]

    def forward(self, x_BTND, tmask=None, pos=None, caches=None, commit=False):
        T = x_BTND.shape[1]
        pos = torch.arange(T, device=x_BTND.device) if pos is None else pos
        rope = rotary(pos, self.head_dim)
        x = self.norm_in(x_BTND) + self.pos_s
        for i, blk in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if self.act_ckpt and self.training:
                x = checkpoint(blk, x, tmask, rope, use_reentrant=False)
            else:
                x = blk(x, tmask, rope, cache, commit, pos)
        return self.norm(x)


def window_mask(T: int, window: int, device) -> torch.Tensor | None:
    """Causal temporal mask (T, T) that also forgets frames more than `window`-1 back (None: plain causal).

    Models trained on clips of `window` frames see no longer history than that on longer clips.
    """
    if T <= window:
        return None
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def init_weights(module: nn.Module) -> None:
    """GPT-style init: small normal weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
