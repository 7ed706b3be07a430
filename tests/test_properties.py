"""Property-based tests (hypothesis): whatever a user types after `--set`, whatever a config.json holds and
whatever a browser sends to `play`, the answer is a correctly typed value or a one-line refusal, never a crash."""

from __future__ import annotations

import dataclasses
import json
import typing

from hypothesis import event, given, settings
from hypothesis import strategies as st

from procgenie import config as C
from procgenie.errors import UserError
from procgenie.overrides import apply_overrides
from procgenie.play.protocol import MAX_MESSAGE, MESSAGES, BadMessage, parse

FEW = settings(max_examples=200, deadline=None)

# -- config: --set key=value -------------------------------------------------------------------

FIELDS = sorted({f.name for cls in (*C.MODEL_CONFIGS.values(), C.TrainConfig) for f in dataclasses.fields(cls)})
PREFIXES = [
    "",
    "model.",
    "train.",
    *[f"{s}." for s in C.STAGES],
    *[f"{s}.train." for s in C.STAGES],
    *[f"{s}.model." for s in C.STAGES],
]
# Text that looks like each kind of value, plus anything at all (newlines and surrogates included).
VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            "yes",
            "off",
            "1",
            "0",
            "fsq",
            "vq",
            "token",
            "add",
            "8,5,5,5",
            "(7, 5)",
            "[]",
            "",
            " 3 ",
            "1e400",
            "-0",
            "nan",
            "0x10",
            "1_000",
            "٣",
        ]
    ),
    st.lists(st.integers(-3, 300), max_size=5).map(lambda xs: ",".join(map(str, xs))),
    st.text(max_size=30),
    st.text(st.characters(blacklist_categories=()), max_size=10),
)
KEYS = st.one_of(
    st.builds(lambda p, f: p + f, st.sampled_from(PREFIXES), st.sampled_from(FIELDS)),
    st.text(max_size=20),
    st.sampled_from(["", "tokenizer", "lam.model", "train", "model.train.lr"]),
)
TYPES = {
    f.name: C.field_types(cls)[f.name]
    for cls in (*C.MODEL_CONFIGS.values(), C.TrainConfig)
    for f in dataclasses.fields(cls)
}


def plausible(typ):
    """Values of the field's own type, mostly in a sensible range: the path on which overrides apply."""
    if typ is bool:
        return st.booleans()
    if typ is int:
        return st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64]), st.integers(-1, 70))
    if typ is float:
        return st.one_of(st.floats(0.0, 1.0), st.floats(-0.1, 2.0))
    if typ is str:
        return st.sampled_from(["fsq", "vq", "token", "add", "other"])
    return st.lists(st.integers(1, 9), max_size=4).map(tuple)


def _text(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)


TYPED_ITEMS = st.sampled_from(FIELDS).flatmap(
    lambda f: st.builds(
        lambda p, v: f"{p}{f}={_text(v)}",
        st.sampled_from(["", "train.", "model.", "lam.", "dynamics.train."]),
        plausible(TYPES[f]),
    )
)
ITEMS = st.one_of(TYPED_ITEMS, st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=30))


def _typed(value, typ) -> bool:
    if typing.get_origin(typ) is tuple:
        return isinstance(value, tuple) and all(type(x) is int for x in value)
    return type(value) is typ


def _assert_well_typed(sc: C.StageConfig) -> None:
    for obj in (sc.model, sc.train):
        for name, typ in C.field_types(type(obj)).items():
            assert _typed(getattr(obj, name), typ), (sc.stage, name, getattr(obj, name))


@FEW
@given(
    items=st.lists(ITEMS, min_size=1, max_size=2),
    only=st.sampled_from([("tokenizer",), ("lam",), ("dynamics",), C.STAGES]),
)
def test_any_override_is_applied_typed_or_refused_in_one_line(items, only):
    stages = C.preset("tiny")
    try:
        apply_overrides(stages, items, only)
    except UserError as e:
        assert str(e) and "\n" not in str(e) and "\r" not in str(e), str(e)
        event("refused")
        return
    event("applied")
    for sc in stages.values():
        _assert_well_typed(sc)
        # what train writes to config.json reads back the same
        assert C.from_dict(json.loads(json.dumps(C.to_dict(sc)))) == sc


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@FEW
@given(
    stage=st.sampled_from(C.STAGES),
    section=st.sampled_from(["model", "train", None]),
    field=st.sampled_from(FIELDS + ["nonsense"]),
    data=st.data(),
)
def test_a_damaged_config_json_is_read_typed_or_refused_in_one_line(stage, section, field, data):
    """One field of a config.json replaced by any JSON value (or a whole section, or the stage name)."""
    value = data.draw(
        st.one_of(JSON, plausible(TYPES.get(field, int)).map(lambda v: list(v) if isinstance(v, tuple) else v))
    )
    d = json.loads(json.dumps(C.to_dict(C.preset("tiny")[stage])))
    if section is None:
        d[field if field in ("stage", "model", "train") else "stage"] = value
    else:
        d[section][field] = value
    try:
        sc = C.from_dict(d)
    except UserError as e:
        assert "\n" not in str(e), str(e)
        event("refused")
        return
    event("read")
    _assert_well_typed(sc)


# -- play: client messages ---------------------------------------------------------------------


def _check_parsed(kind: str, fields: dict, num_latent: int) -> None:
    assert kind in MESSAGES
    for name, value in fields.items():
        assert name in MESSAGES[kind] and type(value) in MESSAGES[kind][name], (kind, name, value)
    if fields.get("latent") is not None:
        assert 0 <= fields["latent"] < num_latent
    if fields.get("level") is not None:
        assert 0 <= fields["level"] < 2**31 - 1


def _parse_or_refuse(text: str, num_latent: int) -> None:
    try:
        kind, fields = parse(text, num_latent)
    except BadMessage as e:
        assert str(e)
        event("refused")
        return
    event("parsed")
    assert len(text.encode("utf-8", "surrogatepass")) <= MAX_MESSAGE
    _check_parsed(kind, fields, num_latent)


@FEW
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.text(st.characters(blacklist_categories=()), max_size=50),
        st.sampled_from(
            [
                "[" * 1000,
                "{" * 600,
                '{"type": "input", "latent": 1e999}',
                "NaN",
                '{"type": "step", "type": "reset"}',
                "x" * (MAX_MESSAGE + 1),
            ]
        ),
    ),
    num_latent=st.integers(1, 16),
)
def test_any_text_is_parsed_to_a_valid_message_or_refused(text, num_latent):
    _parse_or_refuse(text, num_latent)


FIELD_NAMES = sorted({f for fields in MESSAGES.values() for f in fields} | {"type", "extra"})


FIELD_VALUES = st.one_of(JSON, st.booleans(), st.none(), st.integers(-3, 20), st.integers(-(2**40), 2**40))


@FEW
@given(kind=st.one_of(st.sampled_from(sorted(MESSAGES)), JSON), data=st.data(), num_latent=st.integers(1, 16))
def test_any_json_object_is_parsed_to_a_valid_message_or_refused(kind, data, num_latent):
    """Objects shaped like messages: a known or arbitrary type, mostly its own field names, any values."""
    names = sorted(MESSAGES.get(kind, {})) if isinstance(kind, str) else []
    fields = data.draw(
        st.dictionaries(
            st.one_of(st.sampled_from(names or FIELD_NAMES), st.sampled_from(FIELD_NAMES)), FIELD_VALUES, max_size=4
        )
    )
    _parse_or_refuse(json.dumps({"type": kind, **fields}), num_latent)
    _parse_or_refuse(json.dumps({**fields, "type": kind}), num_latent)
