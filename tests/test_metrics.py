"""PSNR, SSIM and NMI against reference implementations and known cases."""

import numpy as np
import pytest

from procgenie import metrics as M

skimage_metrics = pytest.importorskip("skimage.metrics")


def _pairs(seed: int):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    noise = rng.normal(0, 20, a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_match_scikit_image(seed):
    a, b = _pairs(seed)
    ours_p, ours_s = M.psnr(a, b), M.ssim(a, b)
    for i in range(len(a)):
        ref_p = skimage_metrics.peak_signal_noise_ratio(a[i] / 255.0, b[i] / 255.0, data_range=1.0)
        ref_s = skimage_metrics.structural_similarity(
            a[i] / 255.0,
            b[i] / 255.0,
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert ours_p[i] == pytest.approx(ref_p, abs=1e-6)
        assert ours_s[i] == pytest.approx(ref_s, abs=2e-3)


def test_metrics_keep_leading_shape_and_identity_is_perfect():
    a, _ = _pairs(2)
    a = a.reshape(1, 3, 64, 64, 3)
    assert M.psnr(a, a).shape == (1, 3) and (M.psnr(a, a) > 90).all()
    assert np.allclose(M.ssim(a, a), 1.0, atol=1e-6)


def test_nmi_known_cases():
    x = np.array([0, 0, 1, 1, 2, 2] * 50)
    assert M.nmi(x, x) == pytest.approx(1.0)
    assert M.nmi(x, (x + 1) % 3) == pytest.approx(1.0)  # a relabelling is as good
    assert M.nmi(x, np.zeros_like(x)) == 0.0
    rng = np.random.default_rng(0)
    assert M.nmi(rng.integers(0, 8, 20000), rng.integers(0, 15, 20000)) < 0.01


def test_pooled_psnr_averages_errors_not_decibels():
    a, b = _pairs(3)  # (3, 64, 64, 3)
    truth = np.stack([a, a])[:, :, None]  # (2 clips, 3 steps, 1, ...)
    dream = np.stack([a, b])[:, :, None]  # clip 0 exact (PSNR's cap), clip 1 noisy
    per_clip = M.psnr(dream, truth)
    assert (per_clip[0] == 100).all()
    mse = ((b / 255.0 - a / 255.0) ** 2).reshape(3, -1).mean(1)
    assert M.pooled_psnr(dream, truth).shape == (3, 1)
    assert np.allclose(M.pooled_psnr(dream, truth)[:, 0], -10 * np.log10(mse / 2))


@pytest.mark.parametrize("dx, dy", [(3, 0), (-2, 1), (0, -5), (6, 6)])
def test_camera_shift_recovers_a_translation_and_prefers_none_on_a_tie(dx, dy):
    rng = np.random.default_rng(abs(dx * 13 + dy))
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = np.roll(np.roll(a, dy, axis=0), dx, axis=1)  # content moves right by dx, down by dy
    assert M.camera_shift(a, b).tolist() == [dx, dy]
    flat = np.full((2, 64, 64, 3), 90, np.uint8)
    assert M.camera_shift(flat, flat).tolist() == [[0, 0], [0, 0]]


def test_motion_error_sums_shifts_over_the_horizon():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    real = np.stack([base[:, 2 * t : 2 * t + 64] for t in range(5)])[None]  # (1, 5, 64, 64, 3): scrolls 2 px a frame
    still = np.repeat(real[:, :1], 4, 1)
    assert M.motion_error(real[:, 1:], real[:, 1:], real[:, 0]).tolist() == [0.0]
    assert M.motion_error(still, real[:, 1:], real[:, 0]).tolist() == [8.0]  # 4 steps of 2 px missed
