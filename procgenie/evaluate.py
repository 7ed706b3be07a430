"""`procgenie eval`: score a world model on test-split levels and write metrics.json and report.html.

Clips of context + horizon frames come from test episodes (levels no training episode used; `--split val`
takes the val split's, where a dataset has no usable test split). The tokenizer reconstructs them; the LAM
infers their latent actions; the dynamics model continues each clip from its first `context` frames under
those actions (and under random ones, for Genie's controllability metric), and once more one step at a
time from real frames (teacher-forced).

Letters: K clips, C context frames, H horizon, A latent actions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from procgenie import metrics as M
from procgenie.atomic import write_json_atomic
from procgenie.data.loader import ClipSampler
from procgenie.data.store import SPLITS, Dataset
from procgenie.errors import UserError
from procgenie.models import check_data
from procgenie.nn.quantize import usage
from procgenie.steering import held_keys, held_latents, scroll
from procgenie.vocab import NUM_ACTIONS
from procgenie.world import WorldModel

HELD_KEY_LEVELS = 16  # test-split levels (seeds 0, 20, 40, ...) on which each key is held from the start
HELD_LATENT_CLIPS = 16  # test clips from whose context each latent action is held


def test_clips(ds: Dataset, k: int, length: int, seed: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Up to k clips (one per `split` episode, at a random offset): frames (K, L, H, W, 3), real actions (K, L-1)."""
    eps = usable(ds, split, length)
    if len(eps) == 0:
        raise UserError(f"{ds.root} has no {split} episode of {length} frames or more: {_instead(ds, split, length)}")
    rng = np.random.default_rng(seed)
    eps = eps[rng.permutation(len(eps))[:k]]
    frames, actions = [], []
    for ep in eps:
        e = ds.episode(ep)
        s = int(rng.integers(0, ep["length"] - length + 1))
        frames.append(e["frames"][s : s + length])
        actions.append(e["actions"][s : s + length - 1])
    return np.stack(frames), np.stack(actions)


def usable(ds: Dataset, split: str, length: int) -> np.ndarray:
    """The episodes of `split` long enough for a clip of `length` frames."""
    eps = ds.episodes(split)
    return eps[eps["length"] >= length]


def _instead(ds: Dataset, split: str, length: int) -> str:
    """What to do when `split` has no clip of `length` frames: the split that has one (a few recordings imported
    before the import held out a part of each may have no test recording), or more data or a shorter clip."""
    other = [s for s in ("val", "test", "train") if s != split and len(usable(ds, s, length))]
    if other and other[0] != "train":
        return f"evaluate on its {other[0]} split with --split {other[0]}, or lower --context/--horizon"
    if other:
        return "lower --context/--horizon, import or collect longer episodes, or take training clips with --split train"
    return "import or collect longer episodes, or lower --context/--horizon"


def _per_step(fn, a: np.ndarray, b: np.ndarray) -> list[float]:
    """Mean over clips of fn per step: a, b (K, H, ...) -> [H]."""
    return [float(x) for x in fn(a, b).mean(0)]


def evaluate(
    checkpoint,
    data: str,
    out: str,
    episodes: int = 32,
    context: int = 4,
    horizon: int = 10,
    maskgit_steps: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    precision: str = "auto",
    split: str = "test",
    long_play: int = 500,
) -> dict:
    if context < 1 or horizon < 4:
        raise UserError(
            f"--context must be at least 1 and --horizon at least 4 (delta_psnr_t4 needs step 4), "
            f"got {context} and {horizon}"
        )
    if episodes < 1 or long_play < 0:
        raise UserError(f"--episodes must be at least 1 and --long-play 0 or more, got {episodes} and {long_play}")
    if split not in SPLITS:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the report")
    wm = WorldModel.from_pretrained(checkpoint, precision=precision)
    ds = Dataset(data)
    check_data(wm.tok_extra, ds, "world model")
    if wm.action_kind == "real" and not ds.has_actions:
        raise UserError(
            f"{ds.root} has no actions (imported recordings): the dynamics model of {wm.run_dir} takes "
            "real ones; evaluate a run with a latent-action dynamics model"
        )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    C, H = context, horizon
    clips, real = test_clips(ds, episodes, C + H, seed, split)  # (K, C+H, ...), (K, C+H-1)
    if split != "test" and not quiet:
        print(f"eval on the {split} split (--split {split}), not on test: the figures are not test figures")
    K = len(clips)
    bar = tqdm(total=6, desc="eval", disable=quiet, dynamic_ncols=True)

    # Tokenizer: round trip of every clip, and code usage.
    recon = wm.reconstruct(clips)
    codes = torch.from_numpy(wm.encode(clips))  # (K, C+H, N, G)
    use = usage(codes, wm.codebook_size)
    code_hist = torch.bincount(codes.flatten(), minlength=wm.codebook_size).numpy()
    tokenizer = {
        "psnr": float(M.psnr(recon, clips).mean()),
        "ssim": float(M.ssim(recon, clips).mean()),
        "codebook_size": wm.codebook_size,
        "codebook_used": int((code_hist > 0).sum()),
        "perplexity": float(use["perplexity"]),
    }
    bar.update()

    # LAM: latent actions, their next-frame predictions, and how they line up with the real actions.
    latent = wm.infer_actions(clips)  # (K, C+H-1)
    lam_pred = wm.lam_next_frames(clips[:, :-1], latent)  # (K, C+H-1, ...)
    nmi_latent, nmi_real = _action_pairs(wm, ds, seed, split)
    A = wm.num_latent_actions
    confusion = None  # a dataset without actions has nothing to line the latents up with: NMI is absent, not 0
    if ds.has_actions:
        confusion = np.zeros((NUM_ACTIONS, A), np.int64)
        np.add.at(confusion, (nmi_real, nmi_latent), 1)
    lam = {
        "psnr": float(M.psnr(lam_pred, clips[:, 1:]).mean()),
        "num_actions": int(A),
        "actions_used": int(len(np.unique(nmi_latent))),
        "nmi_real_actions": M.nmi(nmi_latent, nmi_real) if ds.has_actions else None,
    }
    bar.update()

    # Dynamics: autoregressive rollouts under the inferred latent actions (the real ones, for a run whose only
    # dynamics model is on real actions) and under random ones.
    given = latent if wm.action_kind == "latent" else real  # (K, C+H-1)
    acts = given[:, C - 1 : C + H - 1]  # a_{C-1} leads to frame C
    before = None if wm.action_kind == "latent" else real[:, : C - 1]  # the LAM infers the context's own
    gen = wm.generate(clips[:, :C], acts, steps=maskgit_steps, seed=seed, context_actions=before)  # (K, H, ...)
    bar.update()
    rand = np.random.default_rng(seed + 1).integers(0, wm.num_actions, acts.shape)
    gen_rand = wm.generate(clips[:, :C], rand, steps=maskgit_steps, seed=seed, context_actions=before)
    bar.update()
    # Play: what a player gets, rollouts under the actions play sends for the clip's real keys (and the keys that
    # led to the context frames), against random actions of the same kind. Recordings without actions have no keys.
    gen_play = play_rand = None
    if ds.has_actions:
        keys = real[:, C - 1 : C + H - 1]
        gen_play = wm.play(clips[:, :C], keys, seed=seed, context_keys=real[:, : C - 1], steps=maskgit_steps)
        if wm.play_kind == "real":
            random_keys = np.random.default_rng(seed + 2).integers(0, NUM_ACTIONS, keys.shape)
            play_rand = wm.play(
                clips[:, :C], random_keys, seed=seed, context_keys=real[:, : C - 1], steps=maskgit_steps
            )
        else:
            play_rand = wm.generate(clips[:, :C], rand, steps=wm.play_steps(maskgit_steps), seed=seed)
    bar.update()
    # Teacher-forced single steps: each horizon frame from the C real frames before it.
    ctx = np.concatenate([clips[:, h : h + C] for h in range(H)])  # (H*K, C, ...)
    ctx_acts = None if before is None else np.concatenate([real[:, h : h + C - 1] for h in range(H)])
    one = wm.generate(
        ctx,
        np.concatenate([given[:, C + h - 1 : C + h] for h in range(H)]),
        steps=maskgit_steps,
        seed=seed,
        context_actions=ctx_acts,
    )[:, 0]
    truth_one = np.concatenate([clips[:, C + h] for h in range(H)])
    bar.update()
    bar.close()
    future = clips[:, C:]
    psnr_by_step = _per_step(M.psnr, gen, future)
    psnr_rand = _per_step(M.psnr, gen_rand, future)
    dynamics = {
        "action_kind": wm.action_kind,
        "context": C,
        "horizon": H,
        "maskgit_steps": int(maskgit_steps or wm.dyn_cfg.model.maskgit_steps),
        "psnr_1step": float(M.psnr(one, truth_one).mean()),
        "ssim_1step": float(M.ssim(one, truth_one).mean()),
        "psnr_by_step": psnr_by_step,
        "ssim_by_step": _per_step(M.ssim, gen, future),
        "delta_psnr_t4": psnr_by_step[3] - psnr_rand[3],
        "mean_psnr_over_horizon": float(np.mean(psnr_by_step)),
        "pooled_psnr_by_step": [float(x) for x in M.pooled_psnr(gen, future)],
    }
    copy = np.repeat(clips[:, C - 1 : C], H, axis=1)
    # Moving clips: the real frame at the last step differs from the last context frame (CoinRun's still screens
    # score the copy-last baseline at PSNR's cap).
    moving = (future[:, -1] != clips[:, C - 1]).reshape(K, -1).any(1)

    def last(a):  # None (JSON's null) when no clip moved
        return float(M.psnr(a[moving, -1], future[moving, -1]).mean()) if moving.any() else None

    dynamics["moving"] = {"clips": int(moving.sum()), "psnr_last_step": last(gen), "copy_last_last_step": last(copy)}
    latent_rows = None
    if wm.action_kind == "latent":  # what each number key of play does, in every world
        dynamics["held_latents"], latent_rows = held_latents(wm, clips[:HELD_LATENT_CLIPS, :C], H, seed)
    play = (
        None
        if gen_play is None
        else _play_block(wm, gen, gen_play, play_rand, clips, C, H, maskgit_steps, seed, last, long_play)
    )
    result = {
        "data": {"episodes": K, "frames": int(K * (C + H)), "actions": ds.has_actions, "split": split},
        "tokenizer": tokenizer,
        "lam": lam,
        "dynamics": dynamics,
        "play": play,
        "baseline_copy_last": {
            "psnr_by_step": _per_step(M.psnr, copy, future),
            "pooled_psnr_by_step": [float(x) for x in M.pooled_psnr(copy, future)],
        },
        "random_actions": {"psnr_by_step": psnr_rand},
        "run": {
            "checkpoint": str(wm.run_dir),
            "data": str(ds.root),
            "seed": seed,
            "device": str(wm.device),
            "precision": wm.precision,
            "seconds": time.perf_counter() - t0,
        },
    }
    write_json_atomic(out_dir / "metrics.json", result)
    from procgenie.report import print_summary, write_report

    write_report(
        out_dir,
        result,
        clips=clips,
        recon=recon,
        gen=gen,
        gen_rand=gen_rand,
        gen_play=gen_play,
        one=(ctx[:, -1], one, truth_one),
        code_hist=code_hist,
        confusion=confusion,
        latent_rows=latent_rows,
    )
    if not quiet:
        print_summary(result, out_dir)
    return result


def _play_block(wm, gen, gen_play, play_rand, clips, C: int, H: int, maskgit_steps, seed: int, last, long_play) -> dict:
    """Figures of what a player gets: rollouts under play's keys for the clips' real keys (gen_play) and under
    random keys (play_rand), their camera motion (and that of `gen`, the rollouts under inferred latents), and
    keys held from the start of Procgen test levels, and CoinRun's moves (steering.scroll)."""
    held = held_keys(wm, levels_for(clips), C, H, seed) if wm.procgen else None
    future, copy = clips[:, C:], np.repeat(clips[:, C - 1 : C], H, axis=1)
    psnr_play, psnr_play_rand = _per_step(M.psnr, gen_play, future), _per_step(M.psnr, play_rand, future)
    return {
        "action_kind": wm.play_kind,
        "maskgit_steps": wm.play_steps(maskgit_steps),
        "psnr_by_step": psnr_play,
        "delta_psnr_t4": psnr_play[3] - psnr_play_rand[3],
        "random_psnr_by_step": psnr_play_rand,
        "mean_psnr_over_horizon": float(np.mean(psnr_play)),
        "pooled_psnr_by_step": [float(x) for x in M.pooled_psnr(gen_play, future)],
        "moving_psnr_last_step": last(gen_play),
        "motion_error_px": float(M.motion_error(gen_play, future, clips[:, C - 1]).mean()),
        "still_motion_error_px": float(M.motion_error(copy, future, clips[:, C - 1]).mean()),
        "inferred_motion_error_px": float(M.motion_error(gen, future, clips[:, C - 1]).mean()),
        "held_keys": held,
        "scroll": scroll(wm, levels_for(clips), C, long_play, seed, held if H == 10 else None) if held else None,
    }


def levels_for(clips: np.ndarray) -> list[int]:
    """The Procgen test-split levels (seeds 0, 20, 40, ...) on which play's keys are held: one per clip, at most
    HELD_KEY_LEVELS."""
    return [20 * i for i in range(min(len(clips), HELD_KEY_LEVELS))]


def _action_pairs(wm: WorldModel, ds: Dataset, seed: int, split: str, batches: int = 16) -> tuple[np.ndarray, ...]:
    """Latent and real actions of many transitions of `split` (clips of the LAM's training length)."""
    T = wm.lam_cfg.model.seq_len
    sampler = ClipSampler(ds, split, min(T, int(ds.episodes(split)["length"].max())), 32, seed=seed)
    lat, real = [], []
    for step in range(batches):
        b = sampler.batch(step)
        lat.append(wm.infer_actions(b["frames"].numpy()).ravel())
        real.append(b["actions"].numpy().ravel())
    return np.concatenate(lat), np.concatenate(real)
