"""Config: presets, `--set` overrides and their one-line errors, round trips through JSON."""

import dataclasses

import pytest

from procgenie import config as C
from procgenie import overrides as O
from procgenie.errors import UserError


@pytest.mark.parametrize("name", C.PRESETS)
def test_presets_validate_and_round_trip(name):
    stages = C.preset(name)
    for sc in stages.values():
        O.validate(sc)
        assert C.from_dict(C.to_dict(sc)) == sc


def test_seed_preset_matches_the_original_config():
    s = C.preset("seed")
    tok, dyn = s["tokenizer"].model, s["dynamics"].model
    assert (tok.image_size, tok.code_dim, tok.codebook_size) == (64, 64, 512)
    assert (tok.width, tok.heads, tok.enc_depth) == (256, 4, 4)
    assert (dyn.width, dyn.heads, dyn.depth, dyn.seq_len) == (256, 4, 4, 16)


def test_overrides_reach_model_and_train_fields():
    s = C.preset("cpu")
    O.apply_overrides(s, ["width=128", "train.lr=3e-4", "precision=fp32", "fsq_levels=8,8,8"], ("tokenizer",))
    assert s["tokenizer"].model.width == 128 and s["tokenizer"].train.lr == 3e-4
    assert s["tokenizer"].train.precision == "fp32" and s["tokenizer"].model.fsq_levels == (8, 8, 8)
    assert s["lam"].model.width == C.preset("cpu")["lam"].model.width  # other stages untouched


def test_stage_prefixed_keys_pick_one_stage_under_all():
    s = C.preset("cpu")
    O.apply_overrides(s, ["dynamics.depth=2", "lam.train.steps=7", "steps=9"], C.STAGES)
    assert s["dynamics"].model.depth == 2 and s["tokenizer"].model.enc_depth == 4
    assert s["lam"].train.steps == 9  # later plain key applies to every stage
    assert s["tokenizer"].train.steps == 9


@pytest.mark.parametrize(
    "item, words",
    [
        ("nosuchkey=1", "unknown --set key 'nosuchkey'"),
        ("width=wide", "expected an integer"),
        ("lr=nan", "expected a finite number"),
        ("deterministic=maybe", "expected true or false"),
        ("precision=fp16", "train.precision must be auto, bf16 or fp32"),
        ("width", "key=value"),
        ("heads=3", "divisible by heads"),
        ("quantizer=pq", "'fsq' or 'vq'"),
    ],
)
def test_bad_overrides_are_one_line_errors(item, words):
    with pytest.raises(UserError) as e:
        O.apply_overrides(C.preset("cpu"), [item], ("tokenizer",))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_and_foreign_config_fields_are_named():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        C.preset("huge")
    d = C.to_dict(C.preset("tiny")["lam"])
    d["model"]["warp_drive"] = 1
    with pytest.raises(UserError, match="incompatible procgenie version"):
        C.from_dict(d)


def test_every_field_has_help():
    for cls in (*C.MODEL_CONFIGS.values(), C.TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
