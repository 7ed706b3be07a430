"""`procgenie <command>`: the command line's parser and its errors; what each command runs is in commands.py."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from procgenie import commands
from procgenie.errors import Stopped, UserError

RAW = argparse.RawDescriptionHelpFormatter


def _at_least_1(text: str) -> int:
    """argparse type of counts that must be positive (argparse names the option in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _precision_arg(parser, what: str, default: str | None = "auto") -> None:
    from procgenie.config import PRECISIONS

    parser.add_argument(
        "--precision",
        default=default,
        choices=PRECISIONS,
        help=f"compute precision to {what}: auto picks bf16 only where this device computes it "
        f"faster than fp32 (CPUs without bf16 instructions emulate it 100x slower)"
        + ("" if default is None else " (default auto)"),
    )


def _checkpoint_arg(parser, what: str = "") -> None:
    parser.add_argument("--checkpoint", default=None, help=f"run folder{what} (default: the bundled model)")


def _maskgit_arg(parser, default: str = "the model's") -> None:
    parser.add_argument("--maskgit-steps", type=_at_least_1, default=None, help=f"MaskGIT steps (default: {default})")


def _recordings_arg(parser) -> None:
    parser.add_argument(
        "--data",
        default=None,
        help="a world learned from recordings: the dataset to start from (default: the one it was trained on)",
    )


def build_parser() -> argparse.ArgumentParser:
    from procgenie.config import PRESETS
    from procgenie.overrides import help_text

    p = argparse.ArgumentParser(
        prog="procgenie",
        description="A Genie-style world model of Procgen CoinRun: "
        "collect play, train tokenizer, latent action model and dynamics, evaluate, play.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "collect",
        help="play Procgen and write a dataset",
        description=(
            "Plays Procgen with vectorised environments and writes frames, real actions, rewards, episode starts "
            "and level seeds. Levels are split train/val/test by seed, never shared. Rerun the same command "
            "after a crash to continue."
        ),
    )
    c.add_argument("--out", required=True, help="dataset folder")
    c.add_argument("--episodes", type=int, required=True, help="episodes the dataset should hold in total")
    c.add_argument("--env", default="coinrun", help="Procgen game (default coinrun)")
    c.add_argument("--policy", default="random", help="random|sticky|explorer|mixed|runner|blend (default random)")
    c.add_argument("--start-level", type=int, default=0, help="first level seed (default 0)")
    c.add_argument("--num-levels", type=int, default=10_000, help="levels in the range (default 10000; 0: all 2^31)")
    c.add_argument("--max-steps", type=int, default=1000, help="cut episodes at this many steps (default 1000)")
    c.add_argument("--seed", type=int, default=0, help="seed of the environments and the policy (default 0)")
    c.add_argument("--workers", type=int, default=1, help="collector processes (default 1)")
    c.add_argument("--envs", type=int, default=16, help="environments per worker (default 16)")
    c.add_argument("--shard-frames", type=int, default=8192, help="frames per shard file (default 8192)")
    c.set_defaults(fn=commands.collect)

    d = sub.add_parser(
        "data",
        help="summarise, check or import a dataset",
        description="`data info DIR` summarises a dataset; `data validate DIR` checks every "
        "checksum and shape and exits non-zero naming each damaged shard; "
        "`data import SRC... --out DIR` makes a dataset of recordings without actions.",
    )
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("info", "summarise a dataset"), ("validate", "check every checksum and shape")):
        a = dsub.add_parser(action, help=text, description=text)
        a.add_argument("dir", help="dataset folder")
        if action == "info":
            a.add_argument("--json", action="store_true", help="print JSON")
        a.set_defaults(fn=commands.data)
    from procgenie.data.importer import FITS, GAP, MANY_SOURCES

    im = dsub.add_parser(
        "import",
        help="videos or frame folders -> a dataset without actions",
        description=(
            "Decodes videos (MP4, WebM, MKV, MOV), GIFs and folders of frames (PNG, JPEG), resamples them to --fps, "
            "makes each frame square (--fit) and --size px, and writes the dataset format that `collect` writes, "
            f"with the actions marked absent. From {MANY_SOURCES} sources on, each stays whole in one split (by "
            "its index in sorted order: 1 in 20 test, 1 in 20 val); fewer are each cut in time, the last tenth held "
            f"out (test or val) after {GAP} dropped frames. Unreadable files are named and skipped. Rerun the same "
            "command to continue."
        ),
    )
    im.add_argument("sources", nargs="+", metavar="SRC", help="video files, GIFs, frame folders, or folders of them")
    im.add_argument("--out", required=True, help="dataset folder")
    im.add_argument(
        "--fps",
        type=float,
        default=None,
        help="resample to this frame rate (default: keep every frame; frame folders are always kept whole)",
    )
    im.add_argument("--size", type=int, default=64, help="frame size in pixels, square (default 64)")
    im.add_argument(
        "--fit",
        default="crop",
        choices=FITS,
        help="how a frame becomes square: centre crop, black padding, or squash (default crop)",
    )
    im.add_argument(
        "--crop",
        default=None,
        metavar="X,Y,W,H",
        help="first cut every frame to this box (source pixels), e.g. to drop a score bar",
    )
    im.add_argument("--episode-frames", type=int, default=1000, help="frames per episode at most (default 1000)")
    im.add_argument(
        "--name", default="video", help="the dataset's world name, kept with the models trained on it (default video)"
    )
    im.set_defaults(fn=commands.import_)

    t = sub.add_parser(
        "train",
        help="train a stage, or all three in order",
        formatter_class=RAW,
        description="Trains the tokenizer, the latent action model, the dynamics model, or all "
        "three in order. Rerunning the same command resumes from the last checkpoint.",
        epilog=help_text(("tokenizer", "lam", "dynamics")),
    )
    t.add_argument("stage", choices=["tokenizer", "lam", "dynamics", "all"])
    t.add_argument("--data", required=True, help="dataset folder (from `procgenie collect`)")
    t.add_argument("--run", required=True, help="run folder: RUN/tokenizer, RUN/lam, RUN/dynamics")
    t.add_argument(
        "--preset",
        default=None,
        choices=PRESETS,
        help="tiny | cpu | seed | genie (default cpu, or the run's own on resume)",
    )
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the preset)")
    t.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE", help="override config fields (see below)")
    _precision_arg(t, "train (saved in the run's config; default: the preset's, auto)", default=None)
    t.set_defaults(fn=commands.train)

    e = sub.add_parser(
        "eval",
        help="evaluate a world model on the test split",
        description="Writes metrics.json, pictures, plots, a GIF and report.html into --out.",
    )
    _checkpoint_arg(e)
    e.add_argument("--data", required=True, help="dataset folder; its test split is used (see --split)")
    e.add_argument("--out", required=True, help="folder for the report")
    e.add_argument("--episodes", type=int, default=32, help="episodes, one clip from each (default 32)")
    e.add_argument(
        "--split",
        default="test",
        choices=("test", "val", "train"),
        help="the split to take clips from (default test; val where a dataset has no usable test split)",
    )
    e.add_argument("--context", type=int, default=4, help="context frames (default 4)")
    e.add_argument("--horizon", type=int, default=10, help="frames generated after the context (default 10)")
    _maskgit_arg(e)
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    e.add_argument(
        "--long-play",
        type=int,
        default=500,
        help="frames of the long play whose sharpness play.scroll reports (0: none)",
    )
    _precision_arg(e, "evaluate")
    e.set_defaults(fn=commands.eval)

    pl = sub.add_parser(
        "play",
        help="play the learned world in a browser",
        description="Serves a page on which you play the learned world with the keyboard.",
    )
    _checkpoint_arg(pl)
    pl.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    pl.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    pl.add_argument(
        "--allow-host",
        dest="allow_hosts",
        metavar="NAME",
        action="append",
        help="a Host name to answer besides localhost, 127.0.0.1, [::1] and the --host address, e.g. the name other "
        "machines reach a --host 0.0.0.0 server by (repeatable); any other Host gets a 403 (DNS rebinding)",
    )
    _maskgit_arg(pl, "1 where the model decodes by expected level, else the smaller of 2 and the model's own")
    pl.add_argument(
        "--start-level", dest="level", metavar="N", type=int, help="first level seed (default: a test level)"
    )
    _recordings_arg(pl)
    pl.add_argument("--fps", type=float, default=15.0, help="target frames per second of each player (default 15)")
    pl.add_argument(
        "--max-players", dest="max_sessions", metavar="N", type=int, default=4, help="players at once (default 4)"
    )
    _precision_arg(pl, "play")
    pl.set_defaults(fn=commands.play)

    from procgenie.dream import ACTIONS_HELP

    dr = sub.add_parser(
        "dream",
        help="render a rollout of the learned world to GIF or MP4",
        formatter_class=RAW,
        description="Starts from a real Procgen level and lets the world model dream on.",
        epilog=ACTIONS_HELP,
    )
    _checkpoint_arg(dr)
    dr.add_argument("--out", required=True, help="FILE.gif or FILE.mp4")
    dr.add_argument(
        "--actions",
        default=None,
        help="actions, e.g. 'right*10,right-up*5,left*3' (CoinRun "
        "names) or latent ids like '3,3,1' (default: right-leaning play)",
    )
    dr.add_argument("--steps", type=int, default=32, help="frames to dream (default 32)")
    dr.add_argument(
        "--level",
        type=int,
        default=None,
        help="start level seed (default: a test level; for a world "
        "learned from recordings, the number of a test recording)",
    )
    _recordings_arg(dr)
    dr.add_argument("--fps", type=int, default=15, help="frames per second of the file (default 15)")
    dr.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _maskgit_arg(dr)
    _precision_arg(dr, "dream")
    dr.set_defaults(fn=commands.dream)

    b = sub.add_parser(
        "bench",
        help="measure training and play speed",
        description="Training frames/s per stage, matmul peak share, play fps and latency.",
        epilog="--set takes the keys that `procgenie train --help` lists, e.g. --set compile=true "
        "or --set dynamics.act_ckpt=false; they change the timed training only.",
    )
    _checkpoint_arg(b, " for play timings")
    b.add_argument("--json", dest="json_path", metavar="PATH", default=None, help="write the results to this JSON file")
    b.add_argument("--preset", default="cpu", choices=PRESETS, help="preset whose training is timed (default cpu)")
    b.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement (default 10)")
    _maskgit_arg(b, "play's")
    b.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override the preset's config fields for the timed training (as `train --set`)",
    )
    _precision_arg(b, "train, time the matmul peak and play")
    b.set_defaults(fn=commands.bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"procgenie {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"procgenie {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"procgenie {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`procgenie data info D | head`); before OSError, its base
        os._exit(0)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every write is atomic (a temporary file, then a rename): what was there before is still whole.
        print(
            f"procgenie {args.command}: error: disk full while writing {e.filename or 'a file'}; what was written "
            "before is intact: free some space and rerun the same command",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
