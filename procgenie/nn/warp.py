"""Motion compensation: the camera's shift between frames, and a frame moved by it.

CoinRun's camera follows the player, so most of what changes from one frame to the next is the whole screen
sliding by a few pixels (three quarters of frame pairs move, 3 px on average). A shift of 1 or 2 px is a
fraction of a tokenizer patch and churns every code, and a dynamics model asked to predict those codes from
scratch smears the screen instead of sliding it. With `warp`, the dynamics model predicts the shift (a small
classification per action) and is given the tokenizer's codes of the last frame moved by it as a prior for the
next frame's codes: what it must still predict is the strip the camera uncovers and what moves on its own.

Letters: B batch, H, W, C pixels; shifts are (dx, dy) in [-MAX_SHIFT, MAX_SHIFT], content moving right or down
positive.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from procgenie.metrics import frame_shift
from procgenie.nn.tokenizer import from_float

MAX_SHIFT = 6  # pixels a frame: CoinRun's fastest camera moves less (metrics.frame_shift's default range)
SHIFTS = 2 * MAX_SHIFT + 1  # classes per axis
PIXEL_PATCH = 8  # warp_prior='pixels': the side of the pixel square that each position of the prior reads


def shift_frames(frames_BHWC: torch.Tensor, shift_B2: torch.Tensor) -> torch.Tensor:
    """Each frame moved by its (dx, dy): out[y, x] = frame[y - dy, x - dx], the uncovered strip repeating the
    border (the screen's edge is the best guess of what comes into view). (B, H, W, C) -> same."""
    B, H, W = frames_BHWC.shape[:3]
    dev = frames_BHWC.device
    ys = (torch.arange(H, device=dev)[None] - shift_B2[:, 1:2]).clamp(0, H - 1)  # (B, H)
    xs = (torch.arange(W, device=dev)[None] - shift_B2[:, 0:1]).clamp(0, W - 1)  # (B, W)
    b = torch.arange(B, device=dev)[:, None, None]
    return frames_BHWC[b, ys[:, :, None], xs[:, None, :]]


def shift_classes(shift_B2: torch.Tensor) -> torch.Tensor:
    """(dx, dy) in pixels -> class indices 0..SHIFTS-1 per axis, clamped to the range."""
    return shift_B2.clamp(-MAX_SHIFT, MAX_SHIFT) + MAX_SHIFT


def shifts_into(shift_BT2: torch.Tensor) -> torch.Tensor:
    """The shifts out of frames 1..T-1 (B, T-1, 2) -> the class of the shift into each of them (B, T-1, 2): what the
    shift head sees with warp_velocity. Nothing is known of the shift into frame 1 (class SHIFTS)."""
    return torch.cat([torch.full_like(shift_BT2[:, :1], SHIFTS), shift_classes(shift_BT2[:, :-1])], 1)


def owed_shift(logits_B2S: torch.Tensor, carry_B2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shift (B, 2) to make now from the shift head's logits (B, 2, SHIFTS): the expected shift plus what the
    frames before left over, rounded; the remainder (B, 2) is carried to the next frame. A camera that the head
    thinks moves 0.4 px a frame moves 1 px every two or three frames, where the most likely shift, 0, never moves."""
    expected = (logits_B2S.softmax(-1) * torch.arange(SHIFTS, device=logits_B2S.device)).sum(-1) - MAX_SHIFT
    owed = carry_B2 + expected
    shift = owed.round().long()
    return shift, owed - shift


@torch.no_grad()
def warped_prior(tokenizer, prev_BHWC: torch.Tensor, shift_B2: torch.Tensor, prev_codes=None) -> torch.Tensor:
    """The tokenizer's codes (B, N, G) of the previous frames (uint8, B, H, W, C) moved by their shifts. Each frame
    is encoded alone (its codes barely depend on the frame before: 1.4% of codes differ). A frame that does not
    move keeps its own codes where `prev_codes` (B, N, G) gives them: in play, the codes it was decoded from, which
    spares the encoder's pass (a fifth of a frame's time on a CPU)."""
    moved = (shift_B2 != 0).any(-1)
    if prev_codes is None or moved.all():
        return tokenizer.encode(shift_frames(prev_BHWC, shift_B2)[:, None])[:, 0]
    out = prev_codes.clone()
    if moved.any():
        out[moved] = tokenizer.encode(shift_frames(prev_BHWC[moved], shift_B2[moved])[:, None])[:, 0]
    return out


def pixel_patches(frames_BTHWC: torch.Tensor, positions: int) -> torch.Tensor:
    """warp_prior='pixels': frames (uint8, B, T, H, W, C) -> each position's pixels (B, T, N, PIXEL_PATCH^2 C) in
    [-1, 1], in the tokenizer's raster order of positions."""
    side = math.isqrt(positions)
    if frames_BTHWC.shape[-2] != side * PIXEL_PATCH:
        raise ValueError(f"warp_prior='pixels' reads {PIXEL_PATCH}-px squares of {side * PIXEL_PATCH}-px frames")
    x = rearrange(frames_BTHWC, "b t (h p) (w q) c -> b t (h w) (p q c)", h=side, w=side)
    return x.float() / 127.5 - 1


@torch.no_grad()
def next_prior(dyn, tokenizer, last_BHWC: torch.Tensor, shift_B2: torch.Tensor, last_codes=None) -> torch.Tensor:
    """What a warp dynamics model steps on: the last frames (uint8, B, H, W, C) moved by their shifts (B, 2), as
    pixels (warp_prior='pixels', no encoder pass) or as the tokenizer's codes (B, N, G) of them (warped_prior)."""
    if dyn.cfg.warp_prior == "pixels":
        return shift_frames(last_BHWC, shift_B2)
    return warped_prior(tokenizer, last_BHWC, shift_B2, last_codes)


@torch.no_grad()
def training_priors(dyn, tokenizer, frames_BTHWC: torch.Tensor, codes_BTNG: torch.Tensor):
    """What a warp model trains on: the priors of frames 2..T (next_prior's, (B, T-1, ...)) and the real camera's
    shifts (B, T-1, 2) into them, which the shift head learns. warp_jitter's share of priors are moved by a shift up
    to 1 px off, as a predicted one may be; warp_recon's share of clips' priors are moved from the tokenizer's
    decoding of the last frame's codes (B, T, N, G), as a rollout moves its own decoded frames."""
    B, T = frames_BTHWC.shape[:2]
    prev = frames_BTHWC[:, :-1]
    shift = frame_shift(prev.flatten(0, 1), frames_BTHWC[:, 1:].flatten(0, 1))
    if dyn.cfg.warp_recon > 0:  # only the chosen clips are decoded
        chosen = torch.rand(B, device=prev.device) < dyn.cfg.warp_recon
        if chosen.any():
            prev = prev.clone()
            prev[chosen] = from_float(tokenizer.decode(codes_BTNG[chosen, :-1]))
    off = torch.randint(-1, 2, shift.shape, device=shift.device)
    jitter = torch.rand(shift.shape[0], 1, device=shift.device) < dyn.cfg.warp_jitter
    prior = next_prior(dyn, tokenizer, prev.flatten(0, 1), shift + off * jitter)
    return prior.unflatten(0, (B, T - 1)), shift.unflatten(0, (B, T - 1))
