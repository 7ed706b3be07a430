"""Typed configs for the three models and their training, the presets, and their JSON form.

Every field carries a one-line `help` that `procgenie train --help` prints (`--set` overrides and the checks
on them: procgenie/overrides.py). A stage's resolved
config (model + train) is written to `RUN/<stage>/config.json`, and every loader rebuilds the
model from that file alone: no hyperparameter is declared twice.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

from procgenie.errors import UserError

STAGES = ("tokenizer", "lam", "dynamics")
PRESETS = ("tiny", "cpu", "seed", "genie")
PRECISIONS = ("auto", "bf16", "fp32")  # what each means: procgenie/precision.py
ACTION_KINDS = ("latent", "real")  # what a dynamics model is conditioned on


def stage_folder(stage: str, model) -> str:
    """A stage's folder in a run: a dynamics model on real actions lives beside the latent one."""
    return "dynamics-real" if stage == "dynamics" and getattr(model, "actions", "latent") == "real" else stage


def _f(default, help: str):
    """A dataclass field with a help line (tuples get a default_factory-free frozen default)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TokenizerConfig:
    """Video tokenizer: conv stem -> ST-transformer -> quantizer -> ST-transformer -> conv head."""

    image_size: int = _f(64, "frame side in pixels")
    patch_size: int = _f(8, "pixels per transformer position side: 8 gives an 8x8 grid at 64 px")
    codes_per_patch: int = _f(4, "codes per position (product quantization): 4 codes on an 8x8 grid = 256 tokens")
    stem_channels: int = _f(32, "channels of the convolutional stem/head (0: plain linear patches)")
    width: int = _f(256, "transformer width")
    enc_depth: int = _f(4, "encoder ST-transformer blocks")
    dec_depth: int = _f(4, "decoder ST-transformer blocks")
    heads: int = _f(4, "attention heads")
    quantizer: str = _f("fsq", "'fsq' (finite scalar quantization) or 'vq' (learned codebook)")
    fsq_levels: tuple[int, ...] = _f((8, 5, 5, 5), "FSQ levels per dimension (codebook = product)")
    codebook_size: int = _f(1024, "VQ codebook entries (ignored by FSQ)")
    code_dim: int = _f(32, "VQ code dimension (ignored by FSQ)")
    commitment: float = _f(0.25, "VQ commitment loss weight")
    seq_len: int = _f(4, "frames per training clip")


@dataclass
class LAMConfig:
    """Latent action model: infers a_t from x_1..x_{t+1}; a decoder rebuilds x_{t+1} from x_1..x_t, a_t."""

    image_size: int = _f(64, "frame side in pixels")
    patch_size: int = _f(8, "pixels per patch side")
    width: int = _f(256, "transformer width")
    enc_depth: int = _f(4, "encoder ST-transformer blocks")
    dec_depth: int = _f(4, "decoder ST-transformer blocks")
    heads: int = _f(4, "attention heads")
    num_actions: int = _f(8, "latent action codebook size")
    code_dim: int = _f(32, "latent action code dimension")
    commitment: float = _f(0.25, "VQ commitment loss weight")
    continuous_frac: float = _f(
        0.25,
        "share of the training steps that use a continuous action latent before the "
        "VQ starts; without it the 8-code VQ collapses before the decoder uses it",
    )
    action_cond: str = _f("token", "how the decoder sees a_t: 'token' (own token) or 'add' (added to every patch)")
    motion_input: bool = _f(True, "the encoder also sees each frame's change since the previous frame")
    seq_len: int = _f(2, "frames per training clip (2: the decoder sees x_t only, so a_t must carry the motion)")


@dataclass
class DynamicsConfig:
    """MaskGIT dynamics model over tokenizer tokens, conditioned on latent actions (Genie) or real ones."""

    actions: str = _f(
        "latent",
        "what conditions each frame: 'latent' (the LAM's actions, Genie; trained into "
        "RUN/dynamics) or 'real' (the dataset's Procgen actions; trained into "
        "RUN/dynamics-real, which play prefers)",
    )
    action_dropout: float = _f(
        0.1,
        "share of training frames whose real action is replaced by 'unknown' "
        "(actions='real' only): lets generation start from context frames whose "
        "actions nobody knows",
    )
    width: int = _f(256, "transformer width")
    depth: int = _f(4, "ST-transformer blocks")
    heads: int = _f(4, "attention heads")
    action_cond: str = _f("token", "how a_t enters: 'token' (own token per frame) or 'add' (added to every token)")
    guidance: float = _f(
        1.0,
        "classifier-free guidance on the action in generation (actions='real' only): each "
        "round's logits moved from the unknown action's by this factor; 1 is off",
    )
    mask_min: float = _f(0.5, "lowest training mask rate")
    mask_max: float = _f(1.0, "highest training mask rate")
    changed_weight: float = _f(
        1.0,
        "loss weight of the masked codes that differ from the previous frame's code at "
        "their place, against 1 for those that stay (1: plain MaskGIT loss)",
    )
    warp: bool = _f(
        False,
        "motion compensation: predict the camera's shift per action and take the codes of the last frame moved "
        "by it as a prior for the next frame's (procgenie/nn/warp.py)",
    )
    warp_velocity: bool = _f(
        False,
        "warp: the shift head also sees the camera's last shift (its velocity), and generation keeps the fraction "
        "of each expected shift for the next frame, so a camera that starts slowly still moves",
    )
    warp_jitter: float = _f(0.25, "share of training frames whose prior is moved by a shift up to 1 px off (warp)")
    warp_prior: str = _f(
        "codes",
        "warp: what the moved last frame gives the next frame: 'codes' (the tokenizer's codes of it: an encoder "
        "pass per moving frame) or 'pixels' (its pixels per position through a linear layer: no encoder pass)",
    )
    warp_recon: float = _f(0.0, "warp: share of training clips whose prior is moved from decoded codes")
    maskgit_steps: int = _f(8, "MaskGIT decoding steps per frame")
    decode: str = _f(
        "sample",
        "how a code is picked: 'sample' (drawn at `temperature`) or 'mean' (each FSQ channel's "
        "expected level, rounded; FSQ tokenizers only)",
    )
    temperature: float = _f(
        1.0, "sampling temperature (0: greedy); decode='mean' samples only when a caller asks for a temperature"
    )
    seq_len: int = _f(16, "frames per training clip (and the longest context)")

    def __post_init__(self):
        if self.warp_prior not in ("codes", "pixels"):
            raise UserError(f"dynamics warp_prior must be 'codes' or 'pixels', got {self.warp_prior!r:.40}")
        if not 0 <= self.warp_recon <= 1:
            raise UserError(f"dynamics warp_recon is a share of clips, 0 to 1: got {self.warp_recon}")


@dataclass
class TrainConfig:
    """One stage's optimisation settings; the same loop trains every stage."""

    steps: int = _f(2000, "optimizer steps")
    batch_size: int = _f(16, "clips per step, summed over all ranks and accumulation micro-steps")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr_frac: float = _f(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup: int = _f(100, "linear warmup steps")
    weight_decay: float = _f(0.05, "AdamW weight decay (matrices only)")
    grad_clip: float = _f(1.0, "gradient norm clip (0: off)")
    precision: str = _f(
        "auto", "'auto' (bf16 autocast only where this device computes it faster than fp32), 'bf16' or 'fp32'"
    )
    compile: bool = _f(False, "torch.compile the model")
    act_ckpt: bool = _f(False, "activation checkpointing of transformer blocks")
    seed: int = _f(0, "seed for initialisation, data order and masking")
    workers: int = _f(1, "DataLoader worker processes")
    log_every: int = _f(25, "steps between log lines")
    ckpt_every: int = _f(250, "steps between checkpoints")
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-repeatable resume on CPU)")


MODEL_CONFIGS = {"tokenizer": TokenizerConfig, "lam": LAMConfig, "dynamics": DynamicsConfig}


@dataclass
class StageConfig:
    """What `RUN/<stage>/config.json` holds: the model's and the trainer's settings."""

    stage: str
    model: TokenizerConfig | LAMConfig | DynamicsConfig
    train: TrainConfig


def preset(name: str) -> dict[str, StageConfig]:
    """The three stages' configs of a preset."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    tok, lam, dyn = TokenizerConfig(), LAMConfig(), DynamicsConfig()
    t_tok, t_lam, t_dyn = TrainConfig(), TrainConfig(), TrainConfig()
    if name == "tiny":  # seconds on a CPU: for tests and the README's quick path
        tok = TokenizerConfig(
            patch_size=16,
            codes_per_patch=2,
            stem_channels=8,
            width=32,
            enc_depth=1,
            dec_depth=1,
            heads=2,
            fsq_levels=(5, 5, 5),
            seq_len=2,
        )
        lam = LAMConfig(patch_size=16, width=32, enc_depth=1, dec_depth=1, heads=2, seq_len=4)
        dyn = DynamicsConfig(width=32, depth=1, heads=2, maskgit_steps=2, seq_len=4)
        t_tok = t_lam = t_dyn = TrainConfig(steps=20, batch_size=4, lr=2e-3, warmup=2, log_every=5, ckpt_every=10)
    elif name == "cpu":  # the default: about an hour on 2 cores end to end (docs/bundled.md has the wall times)
        tok = TokenizerConfig(width=128, seq_len=2)
        lam = LAMConfig(width=128)
        # Decoding: 2 rounds, each code its FSQ channels' expected level; it beat 8 rounds of sampling at a
        # quarter of the cost (docs/bundled.md, "Decoding by expected level"). The temperature serves callers
        # that ask to sample.
        dyn = DynamicsConfig(seq_len=8, maskgit_steps=2, temperature=0.7, decode="mean")
        # Steps split to fit an hour: more dynamics steps beat a better tokenizer at every rollout step
        # (docs/bundled.md, "The cpu preset in 60 minutes").
        t_tok = TrainConfig(steps=2000, batch_size=16, lr=1e-3, warmup=100)
        t_lam = TrainConfig(steps=1300, batch_size=32, lr=3e-4, warmup=100)
        t_dyn = TrainConfig(steps=1900, batch_size=8, lr=1e-3, warmup=100)
    elif name == "seed":  # the original Config class of SEED.md
        tok = TokenizerConfig(
            quantizer="vq",
            codebook_size=512,
            code_dim=64,
            patch_size=4,
            codes_per_patch=1,
            width=256,
            heads=4,
            enc_depth=4,
            dec_depth=4,
            seq_len=16,
        )
        lam = LAMConfig(width=256, heads=4, enc_depth=4, dec_depth=4, seq_len=16)
        dyn = DynamicsConfig(width=256, heads=4, depth=4, seq_len=16)
    elif name == "genie":  # Genie's CoinRun case study (Bruce et al. 2024, appendix)
        tok = TokenizerConfig(
            quantizer="vq",
            codebook_size=1024,
            code_dim=32,
            patch_size=4,
            codes_per_patch=1,
            stem_channels=0,
            width=512,
            enc_depth=8,
            dec_depth=8,
            heads=8,
            seq_len=16,
        )
        lam = LAMConfig(num_actions=6, width=512, enc_depth=8, dec_depth=8, heads=8, seq_len=16)
        dyn = DynamicsConfig(width=512, depth=12, heads=8, maskgit_steps=25, seq_len=16)
        t_tok = TrainConfig(steps=300_000, batch_size=48, lr=3e-4, warmup=1000, act_ckpt=True)
        t_lam = TrainConfig(steps=200_000, batch_size=36, lr=3e-5, warmup=1000, act_ckpt=True)
        t_dyn = TrainConfig(steps=200_000, batch_size=36, lr=3e-5, warmup=1000, act_ckpt=True)
    return {
        "tokenizer": StageConfig("tokenizer", tok, t_tok),
        "lam": StageConfig("lam", lam, t_lam),
        "dynamics": StageConfig("dynamics", dyn, t_dyn),
    }


# ---------------------------------------------------------------------------------------------
# (de)serialisation


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def to_dict(sc: StageConfig) -> dict:
    return {"stage": sc.stage, "model": dataclasses.asdict(sc.model), "train": dataclasses.asdict(sc.train)}


def _of_type(v, typ) -> bool:
    """Is the JSON value v one of the field type `typ` (a bool is no int; an int is a float)?"""
    if typing.get_origin(typ) is tuple:
        return isinstance(v, (list, tuple)) and all(_of_type(x, int) for x in v)
    if typ is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, typ) and (typ is bool or not isinstance(v, bool))


def _from_fields(cls, d: dict):
    types_ = field_types(cls)
    kwargs = {}
    for k, v in d.items():
        if k not in types_:
            raise UserError(
                f"config has unknown field {k!r} for {cls.__name__}: it was written by an "
                "incompatible procgenie version; retrain with this version"
            )
        if not _of_type(v, types_[k]):  # a hand-edited or damaged file: name it here, not in a shape error
            raise UserError(
                f"config field {cls.__name__}.{k} holds {v!r:.40}, not a value of its type: "
                "the config.json is damaged; retrain this stage"
            )
        kwargs[k] = tuple(v) if typing.get_origin(types_[k]) is tuple else float(v) if types_[k] is float else v
    return cls(**kwargs)


def from_dict(d: dict) -> StageConfig:
    stage = d.get("stage") if isinstance(d, dict) else None
    if not isinstance(stage, str) or stage not in MODEL_CONFIGS:
        raise UserError(f"config names an unknown stage {stage!r:.40}")
    if not isinstance(d.get("model"), dict) or not isinstance(d.get("train"), dict):
        raise UserError(
            f"the {stage} config lacks its model or train settings: the config.json is damaged; retrain this stage"
        )
    train = dict(d["train"])
    if "bf16" in train and "precision" not in train:  # runs before 2026-12-02: bf16 on (the old default) means auto
        train["precision"] = "auto" if train.pop("bf16") is True else "fp32"
    return StageConfig(stage, _from_fields(MODEL_CONFIGS[stage], d["model"]), _from_fields(TrainConfig, train))


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
