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
        ref_s = skimage_metrics.structural_similarity(a[i] / 255.0, b[i] / 255.0, data_range=1.0, channel_axis=-1,
                                                      gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
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
    assert M.nmi(x, (x + 1) % 3) == pytest.approx(1.0)           # a relabelling is as good
    assert M.nmi(x, np.zeros_like(x)) == 0.0
    rng = np.random.default_rng(0)
    assert M.nmi(rng.integers(0, 8, 20000), rng.integers(0, 15, 20000)) < 0.01
