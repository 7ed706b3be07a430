"""Motion compensation (`dynamics.warp`): the camera's shift, the moved frame, the shift head's alignment with
the actions, generation against training, and a warp world model through the command line and the API."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, sh
from test_models import make_dynamics

from procgenie import WorldModel
from procgenie.errors import UserError
from procgenie.metrics import frame_shift
from procgenie.nn.warp import (
    MAX_SHIFT,
    SHIFTS,
    next_prior,
    owed_shift,
    pixel_patches,
    shift_frames,
    shifts_into,
    training_priors,
    warped_prior,
)


def texture(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (B, 16, 16, 3), generator=g, dtype=torch.uint8)
    return blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (B, 64, 64, 3): 4-px blocks


@pytest.mark.parametrize("dx, dy", [(2, 0), (-1, 0), (0, 3), (-4, -2)])
def test_a_frame_moved_by_a_shift_is_found_moved_by_it_and_its_uncovered_edge_repeats_the_border(dx, dy):
    a = texture()
    b = shift_frames(a, torch.tensor([[dx, dy]] * 3))
    assert frame_shift(a, b).tolist() == [[dx, dy]] * 3
    if dy == 0 and dx > 0:  # content moved right: the uncovered left strip repeats the old left column
        assert (b[:, :, :dx] == a[:, :, :1]).all()
    assert torch.equal(shift_frames(a, torch.zeros(3, 2, dtype=torch.long)), a)


def warp_pair():
    """A plain tiny dynamics model and the same with warp on, continued from it as scripts/finetune_bundled.py
    does (the new parts at their initial values)."""
    plain = make_dynamics(decode="mean", depth=2, seq_len=5, temperature=0.0)
    warp = make_dynamics(decode="mean", depth=2, seq_len=5, temperature=0.0, warp=True)
    missing, unexpected = warp.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted({k.split(".")[0] for k in missing}) == ["prior_embed", "shift_head"]
    return plain, warp


def test_a_model_continued_with_warp_on_starts_as_it_was():
    plain, warp = warp_pair()
    codes, acts = torch.randint(0, 50, (2, 4, 6, 2)), torch.randint(0, 4, (2, 3))
    mask, prior = torch.rand(2, 3, 6, 2) < 0.7, torch.randint(0, 50, (2, 3, 6, 2))
    logits, _ = warp.teacher_forced_logits(codes, acts, mask, prior)
    assert torch.allclose(logits, plain.teacher_forced_logits(codes, acts, mask), atol=1e-5)
    torch.nn.init.normal_(warp.prior_embed.weight)  # once trained, the prior matters
    assert not torch.allclose(warp.teacher_forced_logits(codes, acts, mask, prior)[0], logits, atol=1e-3)


def test_the_shift_after_frame_t_reads_action_t_and_no_later_frame():
    _, dyn = warp_pair()
    torch.nn.init.normal_(dyn.shift_head.weight)
    codes, acts = torch.randint(0, 50, (1, 4, 6, 2)), torch.zeros(1, 3, dtype=torch.long)
    mask, prior = torch.ones(1, 3, 6, 2, dtype=torch.bool), torch.randint(0, 50, (1, 3, 6, 2))

    def shifts(c, a):
        return dyn._shift_logits(dyn.teacher_forced_logits(c, a, mask, prior)[1], a)  # (1, 3, 2, SHIFTS)

    base = shifts(codes, acts)
    for t in range(3):
        changed = acts.clone()
        changed[:, t] = 2
        out = shifts(codes, changed)
        assert not torch.allclose(out[:, t], base[:, t]) and torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
    later = codes.clone()
    later[:, 2:] = (later[:, 2:] + 1) % 50  # frames 2, 3 change: the shifts after frames 0, 1 must not
    assert torch.allclose(shifts(later, acts)[:, :2], base[:, :2], atol=1e-6)


def test_generation_predicts_the_shift_and_codes_that_the_training_pass_predicts():
    _, dyn = warp_pair()
    torch.nn.init.normal_(dyn.shift_head.weight)
    torch.nn.init.normal_(dyn.prior_embed.weight)
    C, T = 2, dyn.cfg.seq_len
    acts, priors = torch.randint(0, 4, (1, T - 1)), torch.randint(0, 50, (1, T - 1, 6, 2))
    frames, shifts = [torch.randint(0, 50, (1, C, 6, 2))], []
    state = dyn.start(frames[0], F.pad(acts[:, : C - 1], (1, 0), value=dyn.A))
    with pytest.raises(ValueError, match="prior"):
        dyn.step(state, acts[:, C - 1], steps=1)
    for t in range(C, T):
        shifts.append(dyn.next_shift(state, acts[:, t - 1]))
        frames.append(dyn.step(state, acts[:, t - 1], steps=1, prior=priors[:, t - 1])[:, None])
    codes = torch.cat(frames, 1)
    mask = torch.ones(1, T - 1, 6, 2, dtype=torch.bool)
    with torch.no_grad():
        logits, h = dyn.teacher_forced_logits(codes, acts, mask, priors)
        expected = dyn._pick(logits[:, C - 1 :].float(), "mean", 0.0, None)[0]
        expected_shift = dyn._shift_logits(h, acts)[:, C - 1 :].argmax(-1) - MAX_SHIFT
    assert torch.equal(codes[:, C:], expected)
    assert torch.equal(torch.stack(shifts, 1), expected_shift)


def test_the_shift_head_learns_a_scrolling_world():
    """Frames that scroll 2 px right per step under action 1 and stand still under action 0: the loss's shift
    term teaches the head which (it reads the real frames' shifts, as in training on a dataset)."""
    torch.manual_seed(0)
    _, dyn = warp_pair()
    dyn.train()
    base = texture(B=4, seed=1)
    acts = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]])
    frames = [base]
    for t in range(3):
        frames.append(shift_frames(frames[-1], torch.stack([2 * acts[:, t], 0 * acts[:, t]], 1)))
    frames = torch.stack(frames, 1)  # (4, 4, 64, 64, 3)
    codes = torch.randint(0, 50, (4, 4, 6, 2))
    shift = frame_shift(frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1)).unflatten(0, (4, 3))
    assert torch.equal(shift[..., 0], 2 * acts)
    opt = torch.optim.AdamW(dyn.parameters(), 3e-3)
    for _ in range(60):
        loss, metrics = dyn.code_loss(codes, acts, codes[:, 1:], shift)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert metrics["shift_acc"].item() == 1.0


@pytest.mark.slow
def test_a_warp_world_model_trains_evaluates_and_plays_through_the_command_line(tiny_run, coinrun_data, tmp_path):
    import shutil

    run = tmp_path / "warp"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "dynamics")
    run_cli(*sh(f"train dynamics --data {coinrun_data} --run {run} --preset tiny --set warp=true workers=0"))
    wm = WorldModel.from_pretrained(run, device="cpu")
    assert wm.dynamics.cfg.warp
    from procgenie.data.store import Dataset

    ds = Dataset(coinrun_data)
    ep = ds.episodes("train")
    clip = ds.episode(ep[ep["length"] >= 6][0])["frames"][None, :6]
    seen = []
    next_shift = wm.dynamics.next_shift
    wm.dynamics.next_shift = lambda s, a: (seen.append(next_shift(s, a)), seen[-1])[1]
    out = wm.generate(clip[:, :3], np.array([[0, 1, 2]]), seed=0)
    assert out.shape == (1, 3, 64, 64, 3) and len(seen) == 3  # one predicted shift per generated frame
    assert all(s.shape == (1, 2) and s.abs().max() <= MAX_SHIFT for s in seen)
    out_dir = tmp_path / "report"
    run_cli(
        *sh(f"eval --checkpoint {run} --data {coinrun_data} --out {out_dir} --episodes 2 --context 2 --horizon 4"),
        *sh("--long-play 50"),  # play.scroll's long play: 50 frames, not 500 (its figure is not asserted here)
    )
    m = json.loads((out_dir / "metrics.json").read_text())
    assert len(m["dynamics"]["psnr_by_step"]) == 4 and all(np.isfinite(m["dynamics"]["psnr_by_step"]))


# -- warp_velocity: the shift head sees the camera's last shift --------------------------------------------------
def test_a_camera_slower_than_a_pixel_a_frame_still_moves_at_its_rate():
    """A head 60% sure of no shift and 40% of -1 px: the most likely shift never moves the camera; the expected
    shift with its remainder carried moves it 1 px on 4 of 10 frames."""
    p = torch.zeros(1, 2, SHIFTS)
    p[0, 0, MAX_SHIFT], p[0, 0, MAX_SHIFT - 1], p[0, 1, MAX_SHIFT] = 0.6, 0.4, 1.0
    logits, carry, made = p.clamp_min(1e-9).log(), torch.zeros(1, 2), []
    for _ in range(10):
        shift, carry = owed_shift(logits, carry)
        made.append(shift)
    made = torch.cat(made)
    assert (logits.argmax(-1) == MAX_SHIFT).all()
    assert made[:, 0].sum() == -4 and set(made[:, 0].tolist()) == {0, -1} and (made[:, 1] == 0).all()


def test_the_shift_head_sees_the_shift_into_each_frame_and_no_later_one():
    shift = torch.tensor([[[1, 0], [-2, 1], [3, -1]]])  # out of frames 1, 2, 3
    into = shifts_into(shift)
    assert into[0, 0].tolist() == [SHIFTS, SHIFTS]  # frame 1: unknown
    assert torch.equal(into[:, 1:], shift[:, :-1] + MAX_SHIFT)  # frames 2, 3: the shift out of the frame before


def test_generation_with_velocity_decides_the_shifts_that_the_training_pass_predicts():
    dyn = make_dynamics(decode="mean", depth=2, seq_len=5, temperature=0.0, warp=True, warp_velocity=True)
    for p in (dyn.shift_head.weight, dyn.velocity_embed.weight, dyn.prior_embed.weight):
        torch.nn.init.normal_(p)
    C, T = 2, dyn.cfg.seq_len
    acts, priors = torch.randint(0, 4, (1, T - 1)), torch.randint(0, 50, (1, T - 1, 6, 2))
    frames, made, first = [torch.randint(0, 50, (1, C, 6, 2))], [], torch.tensor([[-2, 1]])  # into the last context
    state = dyn.start(frames[0], F.pad(acts[:, : C - 1], (1, 0), value=dyn.A), first)
    for t in range(C, T):
        made.append(dyn.next_shift(state, acts[:, t - 1]))
        frames.append(dyn.step(state, acts[:, t - 1], steps=1, prior=priors[:, t - 1])[:, None])
    made = torch.stack(made, 1)  # (1, T-C, 2)
    assert made.abs().sum() > 0  # random weights: the test would be empty on a still camera
    shift = torch.cat([first[:, None], made], 1)  # out of frames 1.. T-1 (the last one not read)
    with torch.no_grad():
        _, h = dyn.teacher_forced_logits(
            torch.cat(frames, 1), acts, torch.ones(1, T - 1, 6, 2, dtype=torch.bool), priors
        )
        logits = dyn._shift_logits(h, acts, shifts_into(shift))[:, C - 1 :].float()
    carry, expected = torch.zeros(1, 2), []
    for t in range(T - C):
        s, carry = owed_shift(logits[:, t], carry)
        expected.append(s)
    assert torch.equal(made, torch.stack(expected, 1))


def test_a_frame_that_does_not_move_keeps_its_codes_and_only_the_moved_ones_are_encoded():
    class Tokenizer:  # codes (B, 1, N=4, G=1): the first pixels' red values; counts the frames it encodes
        encoded = 0

        def encode(self, frames):
            self.encoded += len(frames)
            return frames[:, :, 0, :4, 0].long()[..., None]

    tok, frames = Tokenizer(), texture(B=3)
    own = torch.full((3, 4, 1), -1)
    shift = torch.tensor([[0, 0], [2, 0], [0, 0]])
    prior = warped_prior(tok, frames, shift, own)
    assert tok.encoded == 1 and (prior[[0, 2]] == -1).all()
    assert torch.equal(prior[1], shift_frames(frames[1:2], shift[1:2])[0, 0, :4, 0].long()[:, None])
    assert torch.equal(warped_prior(tok, frames, shift), tok.encode(shift_frames(frames, shift)[:, None])[:, 0])


def pixel_dynamics(**fields):
    """A warp model whose prior is the moved last frame's pixels: 64 positions (8-px squares of 64-px frames)."""
    torch.manual_seed(0)
    from procgenie.config import DynamicsConfig
    from procgenie.nn.dynamics import Dynamics

    cfg = DynamicsConfig(width=32, depth=2, heads=2, seq_len=5, maskgit_steps=1, decode="mean", warp=True)
    cfg.warp_prior = "pixels"
    for k, v in fields.items():
        setattr(cfg, k, v)
    return Dynamics(cfg, vocab=50, positions=64, codes_per_position=1, num_actions=4, fsq_levels=(5, 10)).eval()


def test_the_pixel_prior_gives_each_position_its_own_square_and_needs_no_encoder():
    frames = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 1, 8, 1, 1).expand(1, 1, 8, 8, 8, 8, 3)
    patches = pixel_patches(frames.reshape(1, 1, 64, 64, 3), 64)  # square (h, w) holds the value 8h + w
    assert patches.shape == (1, 1, 64, 8 * 8 * 3)
    assert torch.equal(patches[0, 0], (torch.arange(64.0) / 127.5 - 1)[:, None].expand(64, 192))

    class NoEncoder:
        def encode(self, frames):
            raise AssertionError("a pixel-prior model stepped through the tokenizer's encoder")

    last, shift = texture(B=2), torch.tensor([[2, 0], [0, -1]])
    assert torch.equal(next_prior(pixel_dynamics(), NoEncoder(), last, shift), shift_frames(last, shift))
    with pytest.raises(UserError, match="warp_prior"):
        from procgenie.config import DynamicsConfig

        DynamicsConfig(warp_prior="pixel")


@pytest.mark.parametrize("velocity", [False, True])
def test_a_pixel_prior_model_generates_what_its_training_pass_predicts(velocity):
    dyn = pixel_dynamics(warp_velocity=velocity, temperature=0.0)
    for p in [dyn.shift_head.weight, dyn.prior_embed.weight] + ([dyn.velocity_embed.weight] if velocity else []):
        torch.nn.init.normal_(p, std=0.5)
    C, T = 2, dyn.cfg.seq_len
    acts = torch.randint(0, 4, (1, T - 1))
    priors = torch.stack([texture(B=1, seed=s)[0] for s in range(T - 1)])[None]  # (1, T-1, 64, 64, 3) pixels
    frames = [torch.randint(0, 50, (1, C, 64, 1))]
    state = dyn.start(frames[0], F.pad(acts[:, : C - 1], (1, 0), value=dyn.A))
    for t in range(C, T):
        dyn.next_shift(state, acts[:, t - 1])
        frames.append(dyn.step(state, acts[:, t - 1], steps=1, prior=priors[:, t - 1])[:, None])
    codes = torch.cat(frames, 1)
    with torch.no_grad():
        logits, _ = dyn.teacher_forced_logits(codes, acts, torch.ones(1, T - 1, 64, 1, dtype=torch.bool), priors)
    assert torch.equal(codes[:, C:], dyn._pick(logits[:, C - 1 :].float(), "mean", 0.0, None)[0])
    other = priors.flip(0).roll(8, 3)  # another prior changes the frames: the model reads it
    with torch.no_grad():
        moved, _ = dyn.teacher_forced_logits(codes, acts, torch.ones(1, T - 1, 64, 1, dtype=torch.bool), other)
    assert not torch.allclose(logits, moved)


@pytest.mark.parametrize("recon", [0.0, 1.0])
def test_warp_recon_trains_on_the_prior_a_rollout_steps_on_and_the_real_camera_shift(recon):
    """warp_recon=1: each prior is moved from the tokenizer's decoding of the last frame's codes (as a rollout moves
    its own decoded frame), never from the frame itself; the shift the head learns is still the real frames'."""
    dyn = pixel_dynamics(warp_jitter=0.0, warp_recon=recon)
    frames = torch.stack([shift_frames(texture(B=2, seed=1), torch.tensor([[-2 * t, t]] * 2)) for t in range(4)], 1)
    codes = torch.randint(0, 50, (2, 4, 64, 1))

    class Tokenizer:  # decodes each code map to its own flat grey: nothing of the real frames
        def decode(self, codes_BTNG):
            grey = codes_BTNG.float().mean((2, 3)) / 50  # (B, T)
            return grey[:, :, None, None, None].expand(*codes_BTNG.shape[:2], 64, 64, 3)

    prior, shift = training_priors(dyn, Tokenizer(), frames, codes)
    assert shift.tolist() == [[[-2, 1]] * 3] * 2  # the real camera's, from the real frames
    seen = frames[:, :-1] if recon == 0 else (Tokenizer().decode(codes[:, :-1]) * 255).round().to(torch.uint8)
    want = shift_frames(seen.flatten(0, 1), shift.flatten(0, 1)).unflatten(0, (2, 3))
    assert torch.equal(prior, want)
    with pytest.raises(UserError, match="warp_recon"):
        from procgenie.config import DynamicsConfig

        DynamicsConfig(warp_recon=1.5)


def test_a_model_trained_on_decoded_priors_steps_on_its_decoded_context_frame():
    """The bundled latent model (warp_recon=1) moves the tokenizer's decoding of the last context frame into its first
    prior, as it moves its own decoded frames after that; play's model (warp_recon=0) moves the frame itself."""
    from procgenie.session import Session

    wm = WorldModel.from_pretrained(device="cpu", precision="fp32")
    assert wm.dynamics.cfg.warp_recon == 1 and wm.play_dynamics.cfg.warp_recon == 0
    ctx = np.random.default_rng(0).integers(0, 256, (1, 2, 64, 64, 3), dtype=np.uint8)  # noise: no tokenizer keeps it
    decoded = wm.reconstruct(ctx)[:, -1]
    last = Session(wm, ctx).last.numpy()
    assert (np.abs(last.astype(int) - decoded.astype(int)) > 2).mean() < 0.001
    assert np.abs(last.astype(int) - ctx[:, -1].astype(int)).mean() > 20
    assert np.array_equal(Session(wm, ctx, dynamics=wm.play_dynamics).last.numpy(), ctx[:, -1])
