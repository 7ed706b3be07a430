"""WorldModel's Python API and `procgenie eval` on a tiny trained run."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
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
    return ds.episode(ep)["frames"][None, :6]          # (1, 6, 64, 64, 3)


def test_api_shapes_and_types(wm, clip):
    assert isinstance(wm.num_latent_actions, int) and wm.num_latent_actions == 8
    rec = wm.reconstruct(clip)
    assert rec.shape == clip.shape and rec.dtype == np.uint8
    acts = wm.infer_actions(clip)
    assert acts.shape == (1, 5) and acts.dtype == np.int64 and (acts < 8).all()
    out = wm.generate(clip[:, :3], np.array([[0, 1, 2, 3]]), seed=1)
    assert out.shape == (1, 4, 64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, wm.generate(clip[:, :3], np.array([[0, 1, 2, 3]]), seed=1))   # seeded
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


SPEC = {
    "data": {"episodes": int, "frames": int},
    "tokenizer": {"psnr": float, "ssim": float, "codebook_size": int, "codebook_used": int, "perplexity": float},
    "lam": {"psnr": float, "num_actions": int, "actions_used": int, "nmi_real_actions": float},
    "dynamics": {"context": int, "horizon": int, "maskgit_steps": int, "psnr_1step": float, "ssim_1step": float,
                 "psnr_by_step": list, "ssim_by_step": list, "delta_psnr_t4": float},
    "baseline_copy_last": {"psnr_by_step": list},
}


def test_eval_writes_every_spec_field_and_a_report(tiny_run, coinrun_data, tmp_path):
    out = tmp_path / "eval"
    run_cli("eval", "--checkpoint", str(tiny_run), "--data", str(coinrun_data), "--out", str(out),
            "--episodes", "4", "--context", "2", "--horizon", "4")
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
    html = (out / "report.html").read_text()
    for img in ("recon_grid.png", "codebook_usage.png", "single_step.png", "multi_step.png", "psnr_by_step.png",
                "lam_confusion.png", "rollout.gif"):
        assert img in html and (out / img).stat().st_size > 1000


def test_real_actions_map_to_the_latent_most_specific_to_them():
    from procgenie.world import most_specific_latent
    counts = np.zeros((15, 4), np.int64)
    counts[:, 0] = 100                      # latent 0 is common with every real action ("keep going")
    counts[7, 2] = 60                       # right: latent 2 is rare overall but comes with it
    counts[5, 3] = 50                       # up: latent 3
    m = most_specific_latent(counts)
    assert counts.argmax(1)[7] == 0 and m[7] == 2 and m[5] == 3 and m[4] == 0


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
    original, copy = WorldModel.from_pretrained(tiny_run), WorldModel.from_pretrained(out)   # links checked
    a, b = original.reconstruct(clip).astype(int), copy.reconstruct(clip).astype(int)
    assert np.abs(a - b).mean() < 2.0       # bf16 weights: nearly the same frames
    (out / "lam" / "model.safetensors").write_bytes((tiny_run / "lam" / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="trained with another lam"):
        WorldModel.from_pretrained(out)
