"""The three models: shapes, causality, action alignment, the MaskGIT sampler, and learning at all."""

import math

import pytest
import torch
import torch.nn.functional as F

from procgenie import config as C
from procgenie.errors import UserError
from procgenie.nn.dynamics import Dynamics
from procgenie.nn.lam import LAM
from procgenie.nn.quantize import FSQ
from procgenie.nn.tokenizer import Tokenizer


def tiny(stage):
    return C.preset("tiny")[stage].model


def frames(B=2, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T, 64, 64, 3), generator=g, dtype=torch.uint8)


def test_tokenizer_shapes_and_causal_codes():
    torch.manual_seed(0)
    tok = Tokenizer(tiny("tokenizer")).eval()
    x = frames(T=3)
    codes = tok.encode(x)
    assert codes.shape == (2, 3, tok.tokens, tok.cfg.codes_per_patch) and codes.dtype == torch.long
    assert tok.decode(codes).shape == (2, 3, 64, 64, 3)
    x2 = x.clone()
    x2[:, 2] = 255 - x2[:, 2]
    z1, z2 = tok._latent(x), tok._latent(x2)
    assert torch.equal(z1[:, :2], z2[:, :2]) and not torch.equal(z1[:, 2], z2[:, 2])


def test_lam_action_t_changes_frame_t_plus_1_and_nothing_before():
    torch.manual_seed(0)
    lam = LAM(tiny("lam")).eval()
    torch.nn.init.normal_(lam.to_pixels.weight, std=0.02)  # as after training: actions matter
    x = frames(T=4)
    acts = torch.zeros(2, 4, dtype=torch.long)
    base = lam.predict(x, acts)  # predictions of frames 1..4
    for t in range(4):
        changed = acts.clone()
        changed[:, t] = 1
        out = lam.predict(x, changed)
        assert torch.equal(out[:, :t], base[:, :t])  # earlier predictions: untouched
        assert not torch.equal(out[:, t], base[:, t])  # frame t+1: changed


def test_lam_infers_action_t_from_frames_up_to_t_plus_1():
    torch.manual_seed(0)
    lam = LAM(tiny("lam")).eval()
    x = frames(T=4)
    assert lam.infer(x).shape == (2, 3)
    x2 = x.clone()
    x2[:, 2] = 0  # change frame 2: actions 0 (0->1) unaffected
    z1, z2 = lam._infer(x).z, lam._infer(x2).z
    assert torch.equal(z1[:, 0], z2[:, 0]) and not torch.equal(z1[:, 1], z2[:, 1])


DECODES = ["sample", "mean"]
LEVELS = (2, 5, 5)  # an FSQ codebook of 50 codes


def make_dynamics(steps=4, decode="sample", **cfg_fields):
    torch.manual_seed(0)
    cfg = tiny("dynamics")
    cfg.maskgit_steps, cfg.decode = steps, decode
    for k, v in cfg_fields.items():
        setattr(cfg, k, v)
    return Dynamics(cfg, vocab=50, positions=6, codes_per_position=2, num_actions=4, fsq_levels=LEVELS).eval()


def test_dynamics_action_t_conditions_frame_t_plus_1_only():
    dyn = make_dynamics()
    codes = torch.randint(0, 50, (1, 4, 6, 2))
    mask = torch.ones(1, 3, 6, 2, dtype=torch.bool)
    acts = torch.zeros(1, 3, dtype=torch.long)
    base = dyn.teacher_forced_logits(codes, acts, mask)  # logits of frames 1..3
    for t in range(3):
        changed = acts.clone()
        changed[:, t] = 2
        out = dyn.teacher_forced_logits(codes, changed, mask)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


def test_dynamics_masked_frame_never_sees_later_or_other_masked_frames():
    dyn = make_dynamics()
    codes = torch.randint(0, 50, (1, 4, 6, 2))
    mask = torch.rand(1, 3, 6, 2) < 0.5
    acts = torch.zeros(1, 3, dtype=torch.long)
    base = dyn.teacher_forced_logits(codes, acts, mask)
    later = codes.clone()
    later[:, 3] = (later[:, 3] + 1) % 50  # frame 3 changes: logits of frames 1, 2 must not
    out = dyn.teacher_forced_logits(later, acts, mask)
    assert torch.allclose(out[:, :2], base[:, :2], atol=1e-6)


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_maskgit_fills_every_code_feeds_back_and_is_seeded(steps, decode):
    dyn = make_dynamics(steps, decode)
    ctx, act0 = torch.randint(0, 50, (2, 3, 6, 2)), torch.full((2, 3), 4)
    seen = []
    logits = dyn._logits
    dyn._logits = lambda h: (seen.append(None), logits(h))[1]
    inputs = []
    embed = dyn._embed
    dyn._embed = lambda c, a, masked, prior=None: (inputs.append((c.clone(), masked)), embed(c, a, masked, prior))[1]

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        state = dyn.start(ctx, act0)
        return dyn.step(state, torch.tensor([1, 2]), generator=g)

    inputs.clear()
    out = run(0)
    assert out.shape == (2, 6, 2) and (out < 50).all() and (out >= 0).all()  # no mask id left
    assert len(seen) == steps  # one transformer pass, one set of logits, per round
    rounds = [c for c, masked in inputs if masked]
    assert len(rounds) == steps and (rounds[0] == dyn.mask_id).all()
    for k in range(1, steps):  # what a round revealed is fed back unchanged, and the schedule holds
        prev, cur = rounds[k - 1], rounds[k]
        known = prev != dyn.mask_id
        assert torch.equal(cur[known], prev[known])
        assert int((cur == dyn.mask_id).sum()) == 2 * int(12 * math.cos(math.pi / 2 * k / steps))
    assert torch.equal(out[:, None][rounds[-1] != dyn.mask_id], rounds[-1][rounds[-1] != dyn.mask_id])
    assert torch.equal(run(0), out)
    assert torch.equal(run(1), out) == (decode == "mean")  # the mean needs no random numbers


@pytest.mark.parametrize("decode", DECODES)
def test_generation_predicts_what_the_teacher_forced_training_pass_predicts(decode):
    """Each generated frame, whose predecessor joins the cache in the same pass, matches the training pass."""
    dyn = make_dynamics(decode=decode, depth=2, seq_len=5, temperature=0.0)
    C, T = 2, dyn.cfg.seq_len
    acts = torch.randint(0, 4, (1, T - 1))  # a_t leads to frame t+1
    frames = [torch.randint(0, 50, (1, C, 6, 2))]
    state = dyn.start(frames[0], F.pad(acts[:, : C - 1], (1, 0), value=dyn.A))
    for t in range(C, T):  # one round from a fully masked frame, argmax: the training pass's prediction
        frames.append(dyn.step(state, acts[:, t - 1], steps=1)[:, None])
    codes = torch.cat(frames, 1)  # (1, T, N, G)
    mask = torch.ones(1, T - 1, 6, 2, dtype=torch.bool)
    with torch.no_grad():
        expected = dyn._pick(dyn.teacher_forced_logits(codes, acts, mask)[:, C - 1 :].float(), decode, 0.0, None)[0]
    assert torch.equal(codes[:, C:], expected)
    dyn.step(state, acts[:, 0], steps=1)  # past the window, the clean past stays seq_len - 1 frames
    assert [c.k.shape[2] for c in state.caches] == [T - 1, T - 1]


@pytest.mark.parametrize("stage", ["tokenizer", "lam", "dynamics"])
def test_overfitting_one_batch_drives_the_loss_down(stage):
    torch.manual_seed(0)
    if stage == "dynamics":
        model = make_dynamics().train()
        codes, actions = torch.randint(0, 50, (4, 4, 6, 2)), torch.randint(0, 4, (4, 3))
        loss_of = lambda: model.code_loss(codes, actions)
    else:
        model = (Tokenizer if stage == "tokenizer" else LAM)(tiny(stage)).train()
        g = torch.Generator().manual_seed(1)
        blocks = torch.randint(0, 256, (4, 1, 4, 4, 3), generator=g, dtype=torch.uint8)
        base = blocks.repeat_interleave(16, 2).repeat_interleave(16, 3)  # (4, 1, 64, 64, 3) colour blocks
        batch = {"frames": torch.cat([base.roll(4 * t, dims=3) for t in range(4)], 1)}  # scrolling
        loss_of = lambda: model.loss(batch)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    first = None
    for _ in range(80):
        loss, _ = loss_of()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_dynamics_loss_for_torch_compile_equals_the_indexed_loss(monkeypatch):
    """Under torch.compile the loss weights every code by the mask instead of indexing the masked ones (fixed
    shapes keep the graph whole): same cross-entropy and accuracy, and metrics stay tensors (no GPU sync)."""
    model = make_dynamics().train()
    codes, actions = torch.randint(0, 50, (3, 4, 6, 2)), torch.randint(0, 4, (3, 3))
    torch.manual_seed(5)
    ce, m = model.code_loss(codes, actions)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(5)
    ce_fixed, m_fixed = model.code_loss(codes, actions)
    assert torch.allclose(ce, ce_fixed, rtol=1e-5) and torch.allclose(m["acc"], m_fixed["acc"])
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())


def test_changed_weight_weighs_the_masked_codes_that_differ_from_the_previous_frame():
    """changed_weight=w: each masked code's cross-entropy counts w times where its code differs from the previous
    frame's at the same place, once where it stays; the weighted mean is over the masked codes only."""
    codes = torch.randint(0, 50, (3, 4, 6, 2))
    codes[:, 1:, :3] = codes[:, :1, :3]  # half the places keep their codes over time
    actions = torch.randint(0, 4, (3, 3))
    model = make_dynamics(changed_weight=4.0).train()
    torch.manual_seed(5)
    ce, _ = model.code_loss(codes, actions)
    torch.manual_seed(5)  # the same mask rate and mask, drawn as code_loss draws them
    rate = torch.empty(3, 3, 1, 1).uniform_(model.cfg.mask_min, model.cfg.mask_max)
    mask = torch.rand(3, 3, 6, 2) < rate
    logits, target = model.teacher_forced_logits(codes, actions, mask), codes[:, 1:]
    each = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none").view(mask.shape)
    w = torch.where(target != codes[:, :-1], 4.0, 1.0) * mask
    assert torch.allclose(ce, (each * w).sum() / w.sum(), rtol=1e-5)
    plain = (each * mask).sum() / mask.sum()
    assert not torch.allclose(ce, plain, rtol=1e-3)  # the weighting changed the loss on this batch
    model.cfg.changed_weight = 1.0
    torch.manual_seed(5)
    assert torch.allclose(model.code_loss(codes, actions)[0], plain, rtol=1e-5)


def test_mean_decoding_rounds_each_channels_expected_level():
    """decode='mean' picks, per FSQ channel, the expected level under the model's distribution over the codebook,
    rounded (levels as the tokenizer's FSQ numbers its codes); its confidence is the product of the picked levels'
    marginal probabilities."""
    dyn, fsq = make_dynamics(decode="mean"), FSQ(LEVELS)
    logits = torch.randn(3, 6, 2, 50) * 3
    code, conf = dyn._pick(logits, "mean", 1.0, None)
    level_of = lambda c: (fsq.embed(c) * fsq.width + fsq.width).round().long()  # (..., Q) levels of codes
    p, digits = logits.softmax(-1), level_of(torch.arange(50))
    marg = [torch.stack([p[..., digits[:, q] == lv].sum(-1) for lv in range(L)], -1) for q, L in enumerate(LEVELS)]
    want = [(m * torch.arange(m.shape[-1])).sum(-1).round().long() for m in marg]
    assert torch.equal(level_of(code), torch.stack(want, -1))
    prod = math.prod(m.gather(-1, w[..., None])[..., 0] for m, w in zip(marg, want))
    assert torch.allclose(conf, prod, atol=1e-5)


def test_mean_decoding_needs_an_fsq_tokenizer():
    cfg = tiny("dynamics")
    cfg.decode = "mean"
    with pytest.raises(UserError, match="needs an FSQ tokenizer"):
        Dynamics(cfg, vocab=50, positions=6, codes_per_position=2, num_actions=4)


def test_mean_decoding_samples_when_a_temperature_is_asked_for():
    """decode='mean' is deterministic; a caller that passes a temperature (wm.generate's argument) gets samples."""
    dyn = make_dynamics(2, "mean")
    ctx, act0, act = torch.randint(0, 50, (2, 3, 6, 2)), torch.full((2, 3), 4), torch.tensor([1, 2])
    run = lambda seed, **kw: dyn.step(dyn.start(ctx, act0), act, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(0), run(1))
    assert not torch.equal(run(0, temperature=1.0), run(1, temperature=1.0))
