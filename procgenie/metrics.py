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
