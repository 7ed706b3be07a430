"""Make a trained run the bundled pretrained model: `python -m procgenie.bundle RUN`.

Copies each stage's (and each dynamics model's) config.json, log.jsonl and weights (stored in bf16, half
the size; the models load them into float32) into procgenie/pretrained/coinrun, without the trainer
state, and points the dynamics models' links at the new weight files' fingerprints. docs/bundled.md records how the
bundled model was trained.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from procgenie import checkpoint as ckpt
from procgenie.atomic import write_json_atomic
from procgenie.errors import UserError
from procgenie.models import Links, check_links, load_stage

STAGES = ("tokenizer", "lam", "dynamics")
DYNAMICS = ("dynamics", "dynamics-real")  # on latent actions, on real ones: a run holds one or both


def bundle(run: Path, out: Path = ckpt.PRETRAINED) -> None:
    run = ckpt.resolve_run(run)
    folders = ["tokenizer", "lam", *(f for f in DYNAMICS if (run / f / "config.json").exists())]
    if folders[-1] == "lam":
        raise UserError(f"{run} has no trained dynamics model: train one before bundling")
    models = {}
    for folder in folders:
        stage = "dynamics" if folder in DYNAMICS else folder
        if stage == "dynamics":
            check_links(run, ckpt.read_config(run / folder, stage)[1])
        model, _, _ = load_stage(run, stage, torch.device("cpu"), folder)
        models[folder] = model
        (out / folder).mkdir(parents=True, exist_ok=True)
        ckpt.save_weights(out / folder / "model.safetensors", model, {"stage": stage}, dtype=torch.bfloat16)
        for name in ("config.json", "log.jsonl", "action_map.json"):
            if (run / folder / name).exists():
                shutil.copyfile(run / folder / name, out / folder / name)
    for folder in DYNAMICS:
        if folder not in folders:
            shutil.rmtree(out / folder, ignore_errors=True)  # a stale one from an earlier bundle
            continue
        config = json.loads((out / folder / "config.json").read_text())
        config["links"] = Links.of(models["tokenizer"], models["lam"], out).to_json()
        write_json_atomic(out / folder / "config.json", config)
        check_links(out, config)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundled {run} into {out} ({size / 1e6:.1f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m procgenie.bundle", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with the tokenizer, LAM and one or both dynamics models trained")
    p.add_argument("--out", default=str(ckpt.PRETRAINED), help="where to write (default: the package's bundle)")
    a = p.parse_args()
    try:
        bundle(Path(a.run), Path(a.out))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
