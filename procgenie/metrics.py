"""Frame and action metrics: PSNR, SSIM (11x11 Gaussian window, sigma 1.5), normalized mutual information.

PSNR and SSIM are computed per frame on uint8 frames scaled to [0, 1], then averaged, as SPEC says.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_msssim import ssim as _ssim


def _unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float (M, C, H, W) in [0, 1]."""
    a = np.asarray(frames)
    return torch.from_numpy(a.reshape(-1, *a.shape[-3:])).permute(0, 3, 1, 2).double() / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame PSNR (dB) of uint8 frames (..., H, W, C); shape (...)."""
    x, y = _unit(a), _unit(b)
    mse = (x - y).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (-10 * mse.log10()).numpy().reshape(np.asarray(a).shape[:-3])


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame SSIM of uint8 frames (..., H, W, C), Gaussian 11x11 window, sigma 1.5; shape (...)."""
    x, y = _unit(a), _unit(b)
    out = _ssim(x, y, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)
    return out.numpy().reshape(np.asarray(a).shape[:-3])


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def nmi(x: np.ndarray, y: np.ndarray) -> float:
    """Normalized mutual information I(x; y) / mean(H(x), H(y)) of two label arrays (0 if either is constant)."""
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1)
    joint /= joint.sum()
    hx, hy = entropy(joint.sum(1)), entropy(joint.sum(0))
    if hx == 0 or hy == 0:
        return 0.0
    mi = hx + hy - entropy(joint.ravel())
    return float(max(0.0, mi) / ((hx + hy) / 2))


def pooled_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR of the mean squared error over the first axis (clips) of uint8 (K, ..., H, W, C); shape (...).

    A clip whose frame equals the truth adds 0 to the mean instead of a capped 100 dB to a mean of dBs."""
    x = torch.from_numpy(np.asarray(a)).double() / 255.0
    y = torch.from_numpy(np.asarray(b)).double() / 255.0
    mse = (x - y).pow(2).flatten(-3).mean(-1).mean(0).clamp(min=1e-10)
    return (-10 * mse.log10()).numpy()


def frame_shift(a_BHWC: torch.Tensor, b_BHWC: torch.Tensor, max_shift: int = 6) -> torch.Tensor:
    """The integer translation (dx, dy) that best maps each frame a onto frame b: the least mean squared error of
    b[y, x] against a[y - dy, x - dx] over the overlap; a tie with no shift (a still or flat screen) is no shift.
    Frames (B, H, W, C), any dtype -> int64 (B, 2)."""
    x, y = a_BHWC.float(), b_BHWC.float()
    H, W = x.shape[1:3]
    r = range(-max_shift, max_shift + 1)
    err = torch.empty(x.shape[0], len(r), len(r), device=x.device)
    for i, dy in enumerate(r):
        for j, dx in enumerate(r):
            src = x[:, max(0, -dy) : H - max(0, dy), max(0, -dx) : W - max(0, dx)]
            dst = y[:, max(0, dy) : H - max(0, -dy), max(0, dx) : W - max(0, -dx)]
            err[:, i, j] = (dst - src).pow(2).flatten(1).mean(1)
    best = err.flatten(1).argmin(1)
    dy, dx = best // len(r) - max_shift, best % len(r) - max_shift
    still = err[:, max_shift, max_shift] <= err.flatten(1).min(1).values
    return torch.stack([dx, dy], -1).masked_fill(still[:, None], 0)


def sharpness(frames: np.ndarray) -> np.ndarray:
    """Mean image-gradient magnitude of uint8 frames (..., H, W, 3) -> (...): sqrt(gx^2 + gy^2) of the grey image
    (forward differences, in levels of 0..255). A smeared texture has less of it than the real one."""
    g = np.asarray(frames, np.float32).mean(-1)
    gx, gy = np.diff(g, axis=-1)[..., :-1, :], np.diff(g, axis=-2)[..., :, :-1]
    return np.sqrt(gx**2 + gy**2).mean((-2, -1))


def camera_shift(a: np.ndarray, b: np.ndarray, max_shift: int = 6) -> np.ndarray:
    """The integer translation (dx, dy) in [-max_shift, max_shift]^2 that best maps frame a onto frame b: the
    least mean squared error of b[y, x] against a[y - dy, x - dx] over the overlap. uint8 (..., H, W, C) pairs ->
    int (..., 2). Content moving right gives dx > 0, down dy > 0 (CoinRun's camera follows the player, so the
    level moves against the player's motion)."""
    a, b = np.asarray(a), np.asarray(b)
    x, y = (torch.from_numpy(f.reshape(-1, *f.shape[-3:])) for f in (a, b))
    return frame_shift(x, y, max_shift).numpy().reshape(*a.shape[:-3], 2)


def motion_error(dream: np.ndarray, real: np.ndarray, last_context: np.ndarray) -> np.ndarray:
    """Per clip, how far the dream's camera goes wrong: the frame-to-frame shifts (camera_shift) from the last
    context frame through the horizon, summed, |dx| + |dy| of the dream's total minus the real video's.
    dream, real uint8 (K, H, S, S, 3); last_context (K, S, S, 3) -> (K,) pixels."""

    def total(frames):
        seq = np.concatenate([last_context[:, None], frames], 1)
        return camera_shift(seq[:, :-1], seq[:, 1:]).sum(1)  # (K, 2)

    return np.abs(total(dream) - total(real)).sum(-1).astype(np.float64)
