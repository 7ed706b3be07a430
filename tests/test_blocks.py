"""Shared blocks and quantizers: shapes, causality in time, rotary caching, codebook health."""

import pytest
import torch

from procgenie.nn.blocks import STTransformer, attend, patchify, unpatchify, window_mask
from procgenie.nn.quantize import FSQ, VectorQuantizer, usage


def test_patchify_round_trips():
    x = torch.randint(0, 255, (2, 3, 64, 64, 3))
    p = patchify(x, 8)
    assert p.shape == (2, 3, 64, 192)
    assert torch.equal(unpatchify(p, 8, 64), x)
    assert torch.equal(p[0, 0, 1], x[0, 0, :8, 8:16].reshape(-1))  # row-major patches


def test_manual_attention_matches_sdpa():
    """Training on a CPU takes the plain matmuls, inference (no gradients) SDPA: the same attention either way."""
    q, k, v = torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16)
    mask = torch.rand(5, 5) < 0.7
    mask[:, 0] = True  # every query attends something
    for kw in ({"causal": False}, {"causal": True}, {"mask": mask}):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=kw.get("mask"), is_causal=kw.get("causal", False)
        )
        assert torch.allclose(attend(q, k, v, **kw), ref, atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(attend(q, k, v, **kw), ref, atol=1e-5)


@pytest.mark.parametrize("t", [0, 1, 2])
def test_temporal_attention_is_causal(t):
    torch.manual_seed(0)
    m = STTransformer(32, 2, 2, tokens=5).eval()
    x = torch.randn(2, 4, 5, 32)
    y = m(x)
    x2 = x.clone()
    x2[:, t + 1] += torch.randn_like(x2[:, t + 1])  # change frame t+1
    y2 = m(x2)
    assert torch.allclose(y[:, : t + 1], y2[:, : t + 1], atol=1e-6)  # frames <= t: untouched
    assert not torch.allclose(y[:, t + 1], y2[:, t + 1])


@pytest.mark.parametrize("grad", [True, False])  # training's attention and inference's (SDPA, one frame unmasked)
def test_kv_cache_gives_the_same_frames_as_a_full_pass(grad):
    torch.manual_seed(0)
    m = STTransformer(32, 2, 2, tokens=6).eval()
    x = torch.randn(1, 7, 6, 32)
    full = m(x, tmask=window_mask(7, 4, x.device))  # a 4-frame window, as a cache of 3 keeps
    caches = m.new_caches(max_len=3)
    with torch.set_grad_enabled(grad):
        out = [m(x[:, :2], pos=torch.arange(2), caches=caches, commit=True)]
        for t in range(2, 7):
            pos = torch.tensor([t])
            look = m(x[:, t : t + 1], pos=pos, caches=caches)  # attends, leaves the cache as it was (MaskGIT's rounds)
            out.append(m(x[:, t : t + 1], pos=pos, caches=caches, commit=True))
            assert torch.equal(look, out[-1])
    assert torch.allclose(torch.cat(out, 1), full, atol=1e-5)
    assert caches[0].pos.tolist() == [4, 5, 6] and caches[0].k.shape[2] == 3


def test_fsq_codes_round_trip_and_cover_the_codebook():
    q = FSQ((8, 5, 5, 5))
    assert q.size == 1000
    z = torch.randn(50000, 4) * 1.5
    out = q(z)
    assert out.codes.min() >= 0 and out.codes.max() < 1000
    assert torch.allclose(q.embed(out.codes), out.z, atol=1e-6)
    assert usage(out.codes, q.size)["codes_used"] > 950
    z.requires_grad_(True)
    q(z).z.sum().backward()
    assert z.grad.abs().sum() > 0  # straight-through gradient


def test_vq_dead_code_reset_revives_unused_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, reset_after=0.5, decay=0.5).train()
    m = torch.nn.functional.normalize(torch.ones(8), dim=0)
    data = 10 * m + torch.randn(4096, 8)  # all on one side of the sphere
    vq.codebook.data[:] = -m + 0.01 * torch.randn(16, 8)  # codes on the far side...
    vq.codebook.data[0] = m  # ...but for one that takes everything
    before = usage(vq.eval()(data).codes, 16)["codes_used"]
    vq.train()
    for _ in range(20):
        vq(data)
    vq.eval()
    after = usage(vq(data).codes, 16)["codes_used"]
    assert before <= 2 and after >= 12


def test_vq_straight_through_and_losses():
    vq = VectorQuantizer(8, 4)
    z = torch.randn(10, 4, requires_grad=True)
    out = vq(z)
    assert out.codes.shape == (10,) and out.loss > 0
    out.z.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
