"""WorldModel's Python API and `procgenie eval` on a tiny trained run."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, sh

from procgenie import WorldModel
from procgenie.data.store import Dataset
from procgenie.errors import UserError


@pytest.fixture(scope="module")
def wm(tiny_run):
    return WorldModel.from_pretrained(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def clip(coinrun_data):
    ds = Dataset(coinrun_data)
    ep = ds.episodes("train")
    ep = ep[ep["length"] >= 6][0]
    return ds.episode(ep)["frames"][None, :6]  # (1, 6, 64, 64, 3)


def test_api_shapes_and_types(wm, clip):
    assert isinstance(wm.num_latent_actions, int) and wm.num_latent_actions == 8
    rec = wm.reconstruct(clip)
    assert rec.shape == clip.shape and rec.dtype == np.uint8
    acts = wm.infer_actions(clip)
    assert acts.shape == (1, 5) and acts.dtype == np.int64 and (acts < 8).all()
    out = wm.generate(clip[:, :3], np.array([[0, 1, 2, 3]]), seed=1)
    assert out.shape == (1, 4, 64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, wm.generate(clip[:, :3], np.array([[0, 1, 2, 3]]), seed=1))  # seeded
    assert all(0 <= wm.latent_for_real_action(a) < 8 for a in range(15))


def test_api_rejects_bad_input_with_clear_errors(wm, clip):
    with pytest.raises(UserError, match="uint8"):
        wm.reconstruct(clip.astype(np.float32))
    with pytest.raises(UserError, match="64, 64, 3"):
        wm.reconstruct(clip[:, :, :32])
    with pytest.raises(UserError, match="latent actions must lie in 0..7"):
        wm.generate(clip[:, :2], np.array([[9]]))
    with pytest.raises(UserError, match="0..14"):
        wm.latent_for_real_action(15)


def test_a_dynamics_model_on_real_actions_trains_beside_the_latent_one(both_run, tiny_run, clip):
    from procgenie.models import read_action_map  # noqa: F401  (the LAM's map stays: play's number keys use it)

    assert (both_run / "dynamics-real" / "model.safetensors").exists()
    latent_cfg = json.loads((both_run / "dynamics" / "config.json").read_text())
    assert latent_cfg["model"]["actions"] == "latent"
    assert (both_run / "dynamics" / "model.safetensors").read_bytes() == (
        tiny_run / "dynamics" / "model.safetensors"
    ).read_bytes()  # the latent model is untouched
    wm = WorldModel.from_pretrained(both_run)
    assert (wm.action_kind, wm.num_actions, wm.play_kind) == ("latent", 8, "real")  # generate: Genie's path
    real = WorldModel.from_pretrained(both_run, actions="real")
    assert (real.action_kind, real.num_actions) == ("real", 15)
    keys = np.array([[7, 7, 5, 1]])
    out = real.generate(clip[:, :3], keys, context_actions=np.array([[4, 4]]), steps=wm.play_steps())
    # play() is what the server shows: its session stepped one key at a time, after context frames under no-op.
    assert np.array_equal(wm.play(clip[:, :3], keys, context_keys=np.array([[4, 4]])), out)
    session = wm.play_session(clip[:, :3], np.array([[4, 4]]))
    assert np.array_equal(np.stack([session.step(torch.tensor([k]))[0] for k in keys[0]])[None], out)
    with pytest.raises(UserError, match="context actions must be the C-1=2"):
        real.generate(clip[:, :3], keys, context_actions=np.array([[4]]))
    with pytest.raises(UserError, match="real actions must lie in 0..14"):
        real.generate(clip[:, :3], np.array([[15]]))


def test_play_on_a_latent_only_run_sends_each_keys_latent(wm, clip):
    keys = np.array([[7, 7, 5, 1]])
    latents = np.array([[wm.latent_for_real_action(k) for k in keys[0]]])
    assert wm.play_kind == "latent"
    assert np.array_equal(wm.play(clip[:, :3], keys), wm.generate(clip[:, :3], latents, steps=wm.play_steps()))
    with pytest.raises(UserError, match="no dynamics model on real actions"):
        WorldModel.from_pretrained(wm.run_dir, actions="real")


def test_a_model_on_real_actions_learns_from_the_datasets_actions_never_the_lam():
    from procgenie.config import DynamicsConfig
    from procgenie.nn.dynamics import Dynamics

    class NoLAM(torch.nn.Module):
        def infer(self, frames):
            raise AssertionError("a dynamics model on real actions asked the LAM")

    class Codes(torch.nn.Module):
        def encode(self, frames):
            return frames[:, :, :, 0, :2].long() % 50  # (B, T, 1, 1, 3) -> (B, T, N=1, G=2)

    dyn = Dynamics(DynamicsConfig(width=32, depth=1, heads=2, seq_len=4, actions="real"), 50, 1, 2, 15)
    dyn.attach(Codes(), NoLAM())
    frames = torch.randint(0, 255, (2, 4, 1, 1, 3), dtype=torch.uint8)
    loss, _ = dyn.loss({"frames": frames, "actions": torch.randint(0, 15, (2, 3))})
    assert torch.isfinite(loss) and dyn.action_embed.num_embeddings == 16  # 15 keys + unknown


SPEC = {
    "data": {"episodes": int, "frames": int},
    "tokenizer": {"psnr": float, "ssim": float, "codebook_size": int, "codebook_used": int, "perplexity": float},
    "lam": {"psnr": float, "num_actions": int, "actions_used": int, "nmi_real_actions": float},
    "dynamics": {
        "context": int,
        "horizon": int,
        "maskgit_steps": int,
        "psnr_1step": float,
        "ssim_1step": float,
        "psnr_by_step": list,
        "ssim_by_step": list,
        "delta_psnr_t4": float,
        "mean_psnr_over_horizon": float,
        "pooled_psnr_by_step": list,
        "moving": dict,
    },
    "play": {
        "psnr_by_step": list,
        "delta_psnr_t4": float,
        "moving_psnr_last_step": float,
        "motion_error_px": float,
        "still_motion_error_px": float,
    },
    "baseline_copy_last": {"psnr_by_step": list, "pooled_psnr_by_step": list},
}


# play.scroll's long play runs for 50 frames, not eval's 500: no test here reads its figure (tests/test_steering.py
# asserts the bundled model's over 500), and on the tiny run the other 450 frames cost seconds per eval.
LONG_PLAY = ("--long-play", "50")


def test_eval_writes_every_spec_field_and_a_report(tiny_run, coinrun_data, tmp_path):
    out = tmp_path / "eval"
    run_cli(
        *sh(f"eval --checkpoint {tiny_run} --data {coinrun_data} --out {out} --episodes 4 --context 2 --horizon 4"),
        *LONG_PLAY,
    )
    m = json.loads((out / "metrics.json").read_text())
    for section, fields in SPEC.items():
        for name, typ in fields.items():
            assert isinstance(m[section][name], typ), (section, name)
    d = m["dynamics"]
    assert (d["context"], d["horizon"]) == (2, 4)
    assert len(d["psnr_by_step"]) == len(d["ssim_by_step"]) == len(m["baseline_copy_last"]["psnr_by_step"]) == 4
    assert d["delta_psnr_t4"] == pytest.approx(d["psnr_by_step"][3] - m["random_actions"]["psnr_by_step"][3])
    assert 0 <= m["tokenizer"]["codebook_used"] <= m["tokenizer"]["codebook_size"]
    assert 0.0 <= m["lam"]["nmi_real_actions"] <= 1.0
    assert d["mean_psnr_over_horizon"] == pytest.approx(np.mean(d["psnr_by_step"]))
    assert set(d["moving"]) == {"clips", "psnr_last_step", "copy_last_last_step"} and 0 <= d["moving"]["clips"] <= 4
    p = m["play"]
    assert p["action_kind"] == "latent" and len(p["psnr_by_step"]) == len(d["pooled_psnr_by_step"]) == 4
    assert p["delta_psnr_t4"] == pytest.approx(p["psnr_by_step"][3] - p["random_psnr_by_step"][3])
    assert p["motion_error_px"] >= 0 and p["still_motion_error_px"] >= 0
    html = (out / "report.html").read_text()
    for img in (
        "recon_grid.png",
        "codebook_usage.png",
        "single_step.png",
        "multi_step.png",
        "psnr_by_step.png",
        "lam_confusion.png",
        "rollout.gif",
    ):
        assert img in html and (out / img).stat().st_size > 1000


def test_real_actions_map_to_the_latent_most_specific_to_them():
    from procgenie.world import most_specific_latent

    counts = np.zeros((15, 4), np.int64)
    counts[:, 0] = 100  # latent 0 is common with every real action ("keep going")
    counts[7, 2] = 60  # right: latent 2 is rare overall but comes with it
    counts[5, 3] = 50  # up: latent 3
    m = most_specific_latent(counts)
    assert counts.argmax(1)[7] == 0 and m[7] == 2 and m[5] == 3 and m[4] == 0


def test_eval_context_1_scores_the_real_action_model_in_play(both_run, coinrun_data, tmp_path):
    """GenieRedux's protocol (one context frame); the play block drives the model on real actions."""
    out = tmp_path / "eval1"
    run_cli(
        *sh(f"eval --checkpoint {both_run} --data {coinrun_data} --out {out} --episodes 3 --context 1 --horizon 4"),
        *LONG_PLAY,
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["dynamics"]["context"] == 1 and m["play"]["action_kind"] == "real"
    assert len(m["play"]["psnr_by_step"]) == 4 and np.isfinite(m["play"]["mean_psnr_over_horizon"])


def test_bundle_makes_a_loadable_bf16_copy_with_relinked_stages(tiny_run, clip, tmp_path):
    from safetensors import safe_open

    from procgenie.bundle import bundle

    out = tmp_path / "bundle"
    bundle(tiny_run, out)
    for stage in ("tokenizer", "lam", "dynamics"):
        assert not (out / stage / "state.safetensors").exists()
        with safe_open(str(out / stage / "model.safetensors"), "pt") as f:
            floats = [f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()]
        assert floats and all(d == torch.bfloat16 for d in floats)
    assert (out / "lam" / "action_map.json").exists()
    original, copy = WorldModel.from_pretrained(tiny_run), WorldModel.from_pretrained(out)  # links checked
    a, b = original.reconstruct(clip).astype(int), copy.reconstruct(clip).astype(int)
    assert np.abs(a - b).mean() < 2.0  # bf16 weights: nearly the same frames
    (out / "lam" / "model.safetensors").write_bytes((tiny_run / "lam" / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="trained with another lam"):
        WorldModel.from_pretrained(out)
