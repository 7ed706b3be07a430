"""Start a run folder that continues one of the bundled model's dynamics models, so that
`procgenie train dynamics` fine-tunes it (the bundle keeps no trainer state):

    python scripts/finetune_bundled.py runs/ft --set changed_weight=4
    procgenie train dynamics --data data/mix --run runs/ft --steps 6500 --set actions=real mask_min=0.9 changed_weight=4

    python scripts/finetune_bundled.py runs/ftl --stage dynamics --set changed_weight=4
    procgenie train dynamics --data data/mix --run runs/ftl --steps 4000 --set changed_weight=4

    python scripts/finetune_bundled.py runs/w --set warp=true   # motion compensation: new parts start neutral

The bundle's other stages are copied as they are; the chosen one gets the bundled config (with --set model
fields changed) and a trainer state at the bundled step: the bundled weights in float32 and a fresh AdamW,
so training resumes on the bundled schedule stretched to the new --steps.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from procgenie import checkpoint as ckpt
from procgenie.models import Links, build
from procgenie.overrides import apply_overrides
from procgenie.train import make_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the run folder to make (must not hold the chosen model yet)")
    p.add_argument("--data", default="data/mix", help="the dataset the fine-tune trains on (default data/mix)")
    p.add_argument(
        "--stage", default="dynamics-real", choices=("dynamics-real", "dynamics"), help="the model to continue"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dynamics model fields to change")
    a = p.parse_args()
    src, run, name = ckpt.PRETRAINED, Path(a.run), a.stage
    if (run / name).exists():
        raise SystemExit(f"error: {run}/{name} exists: choose another run folder")
    for stage in {"tokenizer", "lam", "dynamics", "dynamics-real"} - {name}:
        shutil.copytree(src / stage, run / stage, dirs_exist_ok=True)
    sc, extra = ckpt.read_config(src / name, "dynamics")
    bundled = build(sc, Links.from_json(extra["links"]))
    ckpt.load_weights(src / name / "model.safetensors", bundled)
    apply_overrides({"dynamics": sc}, a.set, ("dynamics",))
    extra["data"]["path"] = str(Path(a.data).resolve())
    out = run / name
    out.mkdir(parents=True)
    ckpt.write_config(out, sc, extra)
    shutil.copyfile(src / name / "log.jsonl", out / "log.jsonl")  # the log goes on from the bundle's
    model = build(sc, Links.from_json(extra["links"]))
    # Parts that --set adds (warp's prior table and shift head) keep their initial values.
    missing, unexpected = model.load_state_dict(bundled.state_dict(), strict=False)
    if unexpected:
        raise SystemExit(f"error: --set removed parts of the bundled model: {unexpected}")
    model = model.float()
    ckpt.save_state(
        out / "state.safetensors", model, make_optimizer(model, sc.train, torch.device("cpu")), sc.train.steps, {}
    )
    print(f"{out}: the bundled {name} model at step {sc.train.steps}, ready to train on")


if __name__ == "__main__":
    main()
