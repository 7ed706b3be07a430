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

import torch

MAX_SHIFT = 6  # pixels a frame: CoinRun's fastest camera moves less (metrics.frame_shift's default range)
SHIFTS = 2 * MAX_SHIFT + 1  # classes per axis


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


@torch.no_grad()
def warped_prior(tokenizer, prev_BHWC: torch.Tensor, shift_B2: torch.Tensor) -> torch.Tensor:
    """The tokenizer's codes (B, N, G) of the previous frames (uint8, B, H, W, C) moved by their shifts. Each frame
    is encoded alone (its codes barely depend on the frame before: 1.4% of codes differ)."""
    return tokenizer.encode(shift_frames(prev_BHWC, shift_B2)[:, None])[:, 0]
