"""What each `procgenie` command runs, given its parsed arguments (cli.py parses them). Each imports its heavy
parts lazily, so `--help` and a bad argument answer at once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from procgenie.errors import UserError


def _options(a) -> dict:
    """The parsed options under the names of the function they go to (cli.py gives each option that name)."""
    return {k: v for k, v in vars(a).items() if k not in ("command", "fn", "action")}


def collect(a) -> None:
    from procgenie.data.collect import collect

    collect(**_options(a))


def data(a) -> None:
    from procgenie.data import store
    from procgenie.data.info import summary

    if a.action == "validate":
        manifest = store.read_manifest(a.dir)
        problems = list(store.iter_problems(Path(a.dir), manifest))
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            raise UserError(
                f"{a.dir}: {len(problems)} damaged shard(s); recollect them by deleting their "
                "records from manifest.json and rerunning the collect command"
            )
        n = sum(s["frames"] for s in manifest["shards"])
        print(f"{a.dir}: {len(manifest['shards'])} shards, {n:,} frames: all checksums and shapes are good")
        return
    info = summary(store.Dataset(a.dir, verify=False))
    if a.json:
        print(json.dumps(info, indent=2))
        return
    print(f"dataset {a.dir}: {info['env']}, {info['image_size']}x{info['image_size']} frames")
    print(
        f"  episodes {info['episodes']:,}  frames {info['frames']:,}  mean episode length "
        f"{info['mean_episode_length']:.1f}  truncated {info['truncated']}"
    )
    for s, d in info["splits"].items():
        print(f"  {s:<5} {d['episodes']:>7,} episodes {d['frames']:>10,} frames {d['levels']:>6,} levels")
    if info["action_histogram"] is None:
        im = info["import"] or {}
        print(
            f"  no actions (imported from {len(im.get('sources', []))} recordings, fps {im.get('fps') or 'kept'}, "
            f"fit {im.get('fit')})"
        )
        return
    print(f"  reached the coin (return > 0): {info['reached_coin']:.1%} of episodes")
    total = max(1, sum(info["action_histogram"].values()))
    print("  actions: " + "  ".join(f"{k} {v / total:.1%}" for k, v in info["action_histogram"].items()))
    c = info["collect"]
    print(
        f"  collected with policy {c.get('policy')}, levels [{c.get('start_level')}, "
        f"{c.get('start_level', 0) + c.get('num_levels', 0)}), seed {c.get('seed')}, max steps {c.get('max_steps')}"
    )


def import_(a) -> None:
    from procgenie.data.importer import import_videos

    import_videos(**_options(a))


def train(a) -> None:
    from procgenie.stages import train_stages

    sets = [*(a.set or []), *([f"precision={a.precision}"] if a.precision else [])]
    train_stages(a.stage, a.data, a.run, preset=a.preset, steps=a.steps, overrides=sets)


def eval(a) -> None:
    from procgenie.evaluate import evaluate

    evaluate(**_options(a))


def play(a) -> None:
    from procgenie.play.server import serve

    serve(**_options(a))


def dream(a) -> None:
    from procgenie.dream import dream

    dream(**_options(a))


def bench(a) -> None:
    from procgenie.bench import bench

    bench(**_options(a))
