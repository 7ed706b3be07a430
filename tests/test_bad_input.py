"""Bad input and faults: each is one line on stderr, `procgenie <command>: error: ...`, exit code 2, no
traceback, naming the problem and the fix, and nothing that existed before is changed.

The commands run in this process (`procgenie.cli.main`): an exception that escapes the command line's
handling fails the test, as a traceback would show it to a user. A busy `play` port is tested in
tests/test_play.py::test_a_busy_port_is_one_clear_line, play's message checks and bounds there and in
tests/test_properties.py.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, sh, write_synthetic
from safetensors import safe_open
from safetensors.torch import load_file

from procgenie import checkpoint as ckpt
from procgenie.cli import main
from procgenie.data import shards, store
from procgenie.errors import UserError


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `roots`: compared before and after a refusal."""
    return {
        str(p): (p.read_bytes() if p.is_file() else None)
        for root in roots
        if root.exists()
        for p in [root, *sorted(root.rglob("*"))]
    }


def refused(capsys, *argv: str, words: tuple[str, ...] = ()) -> str:
    """Run `procgenie ARGV`; it must exit 2 with exactly one line on stderr that holds every one of `words`."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n{err}"
    assert lines[0].startswith(f"procgenie {argv[0]}: error: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in: {lines[0]}"
    return lines[0]


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny trained run, to damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def bigfish(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bigfish") / "data"
    run_cli(
        *sh(f"collect --out {out} --env bigfish --episodes 6 --max-steps 30 --envs 3 --num-levels 40"),
    )
    return out


@pytest.fixture
def small(tmp_path) -> Path:
    """A dataset of 32 px frames, with test-split episodes."""
    return write_synthetic(tmp_path / "small", [20, 20, 20, 20], seeds=[0, 2, 20, 3], size=32)


def data_commands(data: Path, tiny_run: Path, tmp_path: Path) -> dict[str, list]:
    return {
        "train": ["train", "tokenizer", "--data", data, "--run", tmp_path / "new", "--preset", "tiny"],
        "eval": ["eval", "--checkpoint", tiny_run, "--data", data, "--out", tmp_path / "report"],
        "data": ["data", "info", data],
    }


# -- datasets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "eval", "data"])
@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", ("no dataset at", "procgenie collect --out")),
        ("empty", ("not a procgenie dataset (no manifest.json)", "procgenie collect --out")),
        ("unfinished", ("holds no episodes yet", "rerunning its `procgenie collect` command")),
        ("edited", ("manifest.json is damaged", "recollect")),
    ],
)
def test_a_missing_empty_or_unusable_data_folder_is_named(capsys, tiny_run, tmp_path, command, kind, words):
    data = tmp_path / "data"
    if kind != "missing":
        data.mkdir()
    if kind in ("unfinished", "edited"):  # a collection killed before its first shard; a hand-edited manifest
        store.write_manifest(
            data,
            {
                "format": store.FORMAT,
                "version": store.VERSION,
                "env": "coinrun",
                "image_size": 64,
                "collect": {},
                "sessions": 1,
                "shards": [],
            },
        )
    if kind == "edited":
        write_synthetic(data, [5, 6])
        manifest = json.loads((data / "manifest.json").read_text())
        del manifest["shards"][0]["sha256"]
        store.write_manifest(data, manifest)
    before = snapshot(tmp_path, tiny_run)
    refused(capsys, *data_commands(data, tiny_run, tmp_path)[command], words=words)
    assert snapshot(tmp_path, tiny_run) == before


@pytest.mark.parametrize("damage", ["flipped", "truncated", "deleted"])
def test_a_damaged_shard_is_refused_by_train_and_eval_and_named_by_validate(
    capsys, coinrun_data, tiny_run, tmp_path, damage
):
    data = Path(shutil.copytree(coinrun_data, tmp_path / "data"))
    victim = sorted((data / "shards").glob("*.frames.npy"))[1]
    name = victim.name.split(".")[0]
    if damage == "flipped":
        b = bytearray(victim.read_bytes())
        b[-100] ^= 1
        victim.write_bytes(bytes(b))
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-5000])
    else:
        victim.unlink()
    what = "is missing" if damage == "deleted" else "does not match its checksum"
    before = snapshot(tmp_path, tiny_run)
    for command in ("train", "eval"):
        refused(
            capsys,
            *data_commands(data, tiny_run, tmp_path)[command],
            words=(f"shard {name} is damaged", what, "procgenie data validate"),
        )
    # validate: a line per damaged shard, then the error
    assert main(["data", "validate", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and name in err[0] and what in err[0], err
    assert err[1].startswith("procgenie data: error: ") and "1 damaged shard(s)" in err[1]
    assert snapshot(tmp_path, tiny_run) == before


def test_a_dataset_of_another_game_is_refused(capsys, run, bigfish, coinrun_data, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text("{}")  # an earlier report: not written over
    before = snapshot(run, report, bigfish)
    refused(
        capsys,
        *sh(f"eval --checkpoint {run} --data {bigfish} --out {report}"),
        words=("trained on coinrun", "holds bigfish", "use a coinrun dataset"),
    )
    # a dynamics stage on the run's coinrun tokenizer, and resuming a stage on another game's frames
    refused(
        capsys,
        *sh(f"train dynamics --data {bigfish} --run {run} --preset tiny"),
        words=("the tokenizer was trained on coinrun", "holds bigfish"),
    )
    refused(
        capsys,
        *sh(f"train tokenizer --data {bigfish} --run {run} --steps 30 --set workers=0"),
        words=("tokenizer in", "trained on coinrun", "holds bigfish", "another --run"),
    )
    assert snapshot(run, report, bigfish) == before


def test_a_dataset_of_another_frame_size_is_refused(capsys, run, small, tmp_path):
    before = snapshot(run, small)
    refused(
        capsys,
        "eval",
        "--checkpoint",
        run,
        "--data",
        small,
        "--out",
        tmp_path / "report",
        words=("expects 64 px frames", "holds 32 px", "use a dataset of 64 px frames"),
    )
    refused(
        capsys,
        "train",
        "tokenizer",
        "--data",
        small,
        "--run",
        tmp_path / "new",
        "--preset",
        "tiny",
        words=("configured for 64 px frames", "holds 32 px", "--set image_size=32"),
    )
    assert snapshot(run, small) == before and not (tmp_path / "report").exists() and not (tmp_path / "new").exists()


# -- run folders -------------------------------------------------------------------------------


def _all_refuse(capsys, run: Path, coinrun_data: Path, tmp_path: Path, words: tuple[str, ...]) -> None:
    """eval, dream and play all refuse the run folder, and so does the Python API."""
    before = snapshot(run)
    refused(capsys, "eval", "--checkpoint", run, "--data", coinrun_data, "--out", tmp_path / "report", words=words)
    refused(capsys, "dream", "--checkpoint", run, "--out", tmp_path / "dream.gif", words=words)
    refused(capsys, *sh(f"play --checkpoint {run} --port 0"), words=words)
    from procgenie.world import WorldModel

    with pytest.raises(UserError, match=re.escape(words[0])):
        WorldModel.from_pretrained(run, device="cpu")
    assert snapshot(run) == before
    assert not (tmp_path / "report").exists() and not (tmp_path / "dream.gif").exists()


def test_a_checkpoint_of_the_wrong_stage_is_named(capsys, run, coinrun_data, tmp_path):
    shutil.rmtree(run / "tokenizer")
    shutil.copytree(run / "lam", run / "tokenizer")
    _all_refuse(capsys, run, coinrun_data, tmp_path, ("holds a lam checkpoint, not a tokenizer",))
    before = snapshot(run)
    refused(
        capsys,
        *sh(f"train tokenizer --data {coinrun_data} --run {run} --preset tiny"),
        words=("holds a lam checkpoint, not a tokenizer",),
    )
    assert snapshot(run) == before


def test_a_config_naming_another_stage_is_named(capsys, run, coinrun_data, tmp_path):
    cfg = json.loads((run / "dynamics" / "config.json").read_text())
    cfg["stage"] = "lam"
    (run / "dynamics" / "config.json").write_text(json.dumps(cfg))
    _all_refuse(capsys, run, coinrun_data, tmp_path, ("holds a lam checkpoint, not a dynamics",))


def test_weights_of_another_model_are_named(capsys, run, coinrun_data, tmp_path):
    shutil.copy(run / "lam" / "model.safetensors", run / "tokenizer" / "model.safetensors")
    _all_refuse(capsys, run, coinrun_data, tmp_path, ("does not fit the model its config.json describes",))


@pytest.mark.parametrize(
    "damage, words",
    [
        ("config-not-json", ("config.json is damaged", "retrain this stage")),
        ("config-wrong-type", ("config field TokenizerConfig.width holds 'wide'", "retrain this stage")),
        ("weights-truncated", ("model.safetensors is damaged", "retrain this stage, or restore the file")),
    ],
)
def test_a_damaged_checkpoint_file_is_named(capsys, run, coinrun_data, tmp_path, damage, words):
    cfg, weights = run / "tokenizer" / "config.json", run / "tokenizer" / "model.safetensors"
    if damage == "config-not-json":
        cfg.write_text(cfg.read_text()[:-40])
    elif damage == "config-wrong-type":
        cfg.write_text(cfg.read_text().replace('"width": 32', '"width": "wide"', 1))
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    _all_refuse(capsys, run, coinrun_data, tmp_path, words)


def test_a_damaged_trainer_state_is_named_on_resume(capsys, run, coinrun_data):
    state = run / "tokenizer" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-3000])
    before = snapshot(run)
    refused(
        capsys,
        *sh(f"train tokenizer --data {coinrun_data} --run {run} --steps 30 --set workers=0"),
        words=("state.safetensors is damaged", "delete it to restart this stage"),
    )
    assert snapshot(run) == before


def test_a_dynamics_model_paired_with_another_tokenizer_is_refused(capsys, run, coinrun_data, tmp_path):
    # Training the tokenizer on (5 more steps) gives the run another tokenizer than its dynamics model knows.
    old = (run / "tokenizer" / "model.safetensors").read_bytes()
    assert main(sh(f"train tokenizer --data {coinrun_data} --run {run} --steps 25 --set workers=0")) == 0
    assert (run / "tokenizer" / "model.safetensors").read_bytes() != old
    _all_refuse(capsys, run, coinrun_data, tmp_path, ("was trained with another tokenizer", "retrain the dynamics"))
    # Nor does training pass it off as the run's own by rewriting the dynamics config.
    before = snapshot(run)
    for stage in ("dynamics", "all"):
        refused(
            capsys,
            *sh(f"train {stage} --data {coinrun_data} --run {run} --set workers=0"),
            words=("dynamics was trained with another tokenizer", "restore that tokenizer", "another --run"),
        )
    assert snapshot(run) == before


def test_a_run_of_another_format_version_is_named(capsys, run, coinrun_data, tmp_path):
    cfg = json.loads((run / "dynamics" / "config.json").read_text())
    cfg["format_version"] = 7
    (run / "dynamics" / "config.json").write_text(json.dumps(cfg))
    words = ("incompatible procgenie version (format 7, this version reads 1)", "retrain this stage")
    _all_refuse(capsys, run, coinrun_data, tmp_path, words)
    before = snapshot(run)
    refused(capsys, *sh(f"train dynamics --data {coinrun_data} --run {run} --preset tiny"), words=words)
    assert snapshot(run) == before


# -- settings and arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, words",
    [
        ("nosuchkey=1", ("unknown --set key 'nosuchkey' for tokenizer", "valid keys are", "width")),
        ("width=wide", ("bad value for --set width='wide'", "expected an integer")),
        ("lr=inf", ("expected a finite number",)),
        ("deterministic=maybe", ("expected true or false",)),
        ("precision=fp16", ("train.precision must be auto, bf16 or fp32",)),
        ("heads=0", ("heads must be at least 1",)),
        ("log_every=0", ("log_every and train.ckpt_every must be at least 1",)),
        ("seed=-1", ("train.seed must not be negative",)),
        ("fsq_levels=1,5", ("fsq_levels must be one or more levels of at least 2",)),
        ("lr=1e38", ("train.lr 1e+38 is too large",)),
        ("width", ("write it as key=value",)),
    ],
)
def test_a_bad_set_is_one_line_and_writes_nothing(capsys, coinrun_data, tmp_path, item, words):
    refused(
        capsys,
        "train",
        "tokenizer",
        "--data",
        coinrun_data,
        "--run",
        tmp_path / "new",
        "--preset",
        "tiny",
        "--set",
        item,
        words=words,
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["eval", "--checkpoint", "{run}", "--data", "{data}", "--out", "{file}"], ("is a file",)),
        (
            ["eval", "--checkpoint", "{run}", "--data", "{data}", "--out", "{tmp}/r", "--episodes", "0"],
            ("--episodes must be at least 1",),
        ),
        (["train", "lam", "--data", "{data}", "--run", "{file}"], ("--run", "is a file")),
        (["collect", "--out", "{tmp}/c", "--episodes", "2", "--envs", "0"], ("--envs must be at least 1",)),
        (["play", "--checkpoint", "{run}", "--fps", "0"], ("--fps must lie in",)),
        (["eval", "--checkpoint", "{tmp}/nothing", "--data", "{data}", "--out", "{tmp}/r"], ("no run folder at",)),
    ],
)
def test_bad_arguments_are_one_line(capsys, tiny_run, coinrun_data, tmp_path, argv, words):
    (tmp_path / "afile").write_text("mine")
    fill = {"run": tiny_run, "data": coinrun_data, "file": tmp_path / "afile", "tmp": tmp_path}
    before = snapshot(tmp_path, tiny_run)
    refused(capsys, *[a.format(**fill) for a in argv], words=words)
    assert snapshot(tmp_path, tiny_run) == before


# -- faults during training and collection -----------------------------------------------------


def _step_of(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return json.loads(meta["json"])["step"] if "json" in meta else json.loads(meta["step"])


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint_kept(capsys, coinrun_data, tmp_path):
    run = tmp_path / "run"
    # The learning rate grows 10 per step (warmup): the LAM diverges after a few checkpoints.
    code = main(
        sh(
            f"train lam --data {coinrun_data} --run {run} --preset tiny --steps 60 "
            "--set workers=0 ckpt_every=5 log_every=1 lr=1e4 warmup=1000"
        )
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2, last
    m = re.fullmatch(
        r"procgenie train: error: lam: the loss became non-finite at step (\d+); the checkpoint of "
        r"step (\d+) is kept: lower the learning rate \(--set lr=3\.3e\+03\) and train into another "
        r"--run",
        last,
    )
    assert m, last
    step, kept = map(int, m.groups())
    assert 5 <= kept <= step and kept % 5 == 0
    stage = run / "lam"
    assert _step_of(stage / "state.safetensors") == kept and _step_of(stage / "model.safetensors") == kept
    assert all(v.isfinite().all() for v in load_file(str(stage / "model.safetensors")).values())
    from procgenie.models import load_stage

    load_stage(run, "lam", torch.device("cpu"))  # and it loads
    assert not list(stage.glob(".*.tmp"))


def test_a_diverging_tokenizer_is_stopped_in_one_line(capsys, coinrun_data, tmp_path):
    code = main(
        sh(
            f"train tokenizer --data {coinrun_data} --run {tmp_path / 'run'} "
            "--preset tiny --steps 20 --set workers=0 lr=1e30"
        )
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "the loss became non-finite at step 1; nothing was checkpointed" in last, last


def _full_disk_on(monkeypatch, call: int, seen: dict):
    """Make checkpoint writing run out of disk at its `call`-th file, half-way through the temporary file."""
    real = ckpt.save_file
    count = [0]

    def save_file(tensors, tmp, metadata=None):
        count[0] += 1
        if count[0] != call:
            return real(tensors, tmp, metadata=metadata)
        stage = Path(tmp).parent
        seen.update({p.name: p.read_bytes() for p in stage.glob("*.safetensors")})  # what is on disk now
        real(tensors, tmp, metadata=metadata)
        with open(tmp, "r+b") as fh:
            fh.truncate(Path(tmp).stat().st_size // 2)
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def _full_disk_args(data: Path) -> list[str]:
    """A 15-step tokenizer run that checkpoints every 5 steps (without its --run)."""
    return sh(f"train tokenizer --data {data} --preset tiny --steps 15 --set workers=0 ckpt_every=5")


@pytest.fixture(scope="module")
def unbroken(coinrun_data, tmp_path_factory) -> Path:
    """The run that never failed, which every full-disk run must end at: trained once for all of them."""
    run = tmp_path_factory.mktemp("unbroken") / "run"
    assert main([*_full_disk_args(coinrun_data), "--run", str(run)]) == 0
    return run


@pytest.mark.parametrize("call", [3, 4])  # checkpoint of step 10: its weights (3rd file), its trainer state (4th)
def test_a_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(
    capsys, monkeypatch, coinrun_data, unbroken, tmp_path, call
):
    args = _full_disk_args(coinrun_data)
    seen: dict[str, bytes] = {}
    with monkeypatch.context() as m:
        _full_disk_on(m, call, seen)
        capsys.readouterr()
        code = main([*args, "--run", str(tmp_path / "run")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    stage = tmp_path / "run" / "tokenizer"
    assert code == 2 and re.fullmatch(
        r"procgenie train: error: disk full while writing \S+safetensors; the previous "
        r"checkpoint is intact: free some space and rerun the same command",
        last,
    ), last
    assert {p.name: p.read_bytes() for p in stage.glob("*.safetensors")} == seen  # untouched by the failed write
    assert not list(stage.glob(".*.tmp"))
    # space freed: the same command finishes, to the weights of a run that never failed
    assert main([*args, "--run", str(tmp_path / "run")]) == 0
    a = load_file(str(stage / "model.safetensors"))
    b = load_file(str(unbroken / "tokenizer" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_full_disk_while_collecting_loses_nothing_recorded(capsys, monkeypatch, tmp_path):
    out = tmp_path / "d"
    args = [
        "collect",
        "--out",
        str(out),
        "--episodes",
        "24",
        "--max-steps",
        "40",
        "--shard-frames",
        "100",
        "--envs",
        "4",
    ]
    real, count = shards._save_npz, [0]

    def save_npz(tmp, arrays):
        count[0] += 1
        if count[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
        real(tmp, arrays)

    with monkeypatch.context() as m:
        m.setattr(shards, "_save_npz", save_npz)
        capsys.readouterr()
        code = main(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        code == 2
        and last.startswith("procgenie collect: error: disk full while writing ")
        and "free some space and rerun the same command" in last
    ), last
    files = sorted(p.name for p in (out / "shards").iterdir())
    time.sleep(1)  # no write queued behind the failed one goes on after the command returned (a rerun may start)
    assert sorted(p.name for p in (out / "shards").iterdir()) == files
    recorded = json.loads((out / "manifest.json").read_text())["shards"]
    assert len(recorded) == 2
    assert main(["data", "validate", str(out)]) == 0
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][:2] == recorded and sum(s["episodes"] for s in manifest["shards"]) == 24
    assert main(["data", "validate", str(out)]) == 0


def test_errors_from_a_real_process_have_no_traceback(coinrun_data, tmp_path):
    """The same handling in a real `python -m procgenie` process, as a user runs it."""
    proc = run_cli(*sh(f"train tokenizer --data {tmp_path / 'nothing'} --run {tmp_path / 'r'}"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("procgenie train: error: no dataset at")
