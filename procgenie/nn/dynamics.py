"""MaskGIT dynamics: the next frame's tokens from past frames' tokens and actions.

The actions are Genie's latent actions (what the frozen LAM infers between frames) or, with
`actions='real'`, the dataset's own Procgen actions (GenieRedux-G's variant), the keys a player presses.

Training runs two streams through one ST-transformer: a clean stream of frames 1..T-1 and a masked
stream of frames 2..T (each frame's codes masked at a rate drawn from [mask_min, mask_max]). Masked
frame t attends the clean frames before it and itself, never another masked frame, so training sees
exactly what generation sees: clean past keys and values (cached) and one partly known frame.
Frame t carries the action a_{t-1} that led to it; action index A means unknown.

Generation (MaskGIT): start fully masked; each of `steps` rounds picks every masked code, keeps the
most confident ones (a cosine schedule says how many stay masked) and feeds them back (maskgit.pick says
how a code is picked). The finished frame joins the key/value cache of the clean past in the next frame's
first round, which runs it beside the new masked frame as in training's two streams: one transformer pass
fewer per frame. The clean past then holds seq_len-1 frames at most, as in training.

Letters: B batch, T frames, N positions per frame, G codes per position, V codebook size, D width,
A actions (latent, or Procgen's vocab.NUM_ACTIONS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from procgenie.config import DynamicsConfig
from procgenie.errors import UserError
from procgenie.nn.blocks import STTransformer, init_weights, window_mask
from procgenie.nn.maskgit import pick
from procgenie.nn.stage import StageModel
from procgenie.nn.warp import (
    PIXEL_PATCH,
    SHIFTS,
    owed_shift,
    pixel_patches,
    shift_classes,
    shifts_into,
    training_priors,
)


def two_stream_mask(T: int, device) -> torch.Tensor:
    """(2T-2, 2T-2) temporal mask: clean frames 0..T-2 (causal), then masked frames 1..T-1.

    Masked frame i attends clean frames j < i and itself.
    """
    i = torch.arange(T - 1, device=device)
    clean = i[:, None] >= i[None, :]  # clean -> clean, causal
    masked_clean = i[:, None] + 1 > i[None, :]  # masked i+1 -> clean j <= i
    top = torch.cat([clean, torch.zeros_like(clean)], 1)
    bottom = torch.cat([masked_clean, torch.eye(T - 1, dtype=torch.bool, device=device)], 1)
    return torch.cat([top, bottom], 0)


@dataclass
class Frozen:
    """The trained tokenizer and LAM that the dynamics stage learns on, held beside its weights, not in them."""

    tokenizer: nn.Module
    lam: nn.Module


@dataclass
class Rollout:
    """Where a generation stands: the key/value caches, the next frame's time index, and the last generated
    frame (codes, action), which joins the caches in the next step's first round."""

    caches: list
    t: int
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    last_h: torch.Tensor | None = None  # (B, 1, N', D) the last clean frame's output (warp: the shift head's input)
    last_shift: torch.Tensor | None = None  # (B, 2) warp_velocity: the class of the camera's shift into that frame
    carry: torch.Tensor | None = None  # (B, 2) warp_velocity: the fraction of a pixel the camera still owes


class Dynamics(StageModel):
    def __init__(
        self,
        cfg: DynamicsConfig,
        vocab: int,
        positions: int,
        codes_per_position: int,
        num_actions: int,
        fsq_levels: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.cfg, D = cfg, cfg.width
        self.V, self.N, self.G, self.A = vocab, positions, codes_per_position, num_actions
        self.mask_id = vocab
        self.real = cfg.actions == "real"  # Procgen's actions, not the LAM's
        self.levels = tuple(fsq_levels) if fsq_levels else None  # FSQ: a code's levels per channel
        if cfg.decode == "mean" and self.levels is None:
            raise UserError("dynamics decode='mean' needs an FSQ tokenizer: use decode='sample' with a VQ tokenizer")
        self.code_embed = nn.Embedding(self.G * (vocab + 1), D)  # one table per code slot
        self.action_embed = nn.Embedding(num_actions + 1, D)  # + "unknown": before frame 1, or dropped
        self.target = nn.Parameter(torch.zeros(D))  # marks the masked stream
        self.token_cond = cfg.action_cond == "token"
        self.transformer = STTransformer(D, cfg.depth, cfg.heads, positions + self.token_cond)
        self.head = nn.Linear(D, self.G * vocab)
        self.pixels = cfg.warp and cfg.warp_prior == "pixels"  # the prior read from pixels, not from codes
        if cfg.warp:  # the prior (a code table per slot, or a layer on pixels), the shift after a frame per action
            self.prior_embed = (
                nn.Linear(3 * PIXEL_PATCH**2, D) if self.pixels else nn.Embedding(self.G * (vocab + 1), D)
            )
            self.shift_head = nn.Linear(D, (num_actions + 1) * 2 * SHIFTS)
        self.velocity = cfg.warp and cfg.warp_velocity  # the shift head sees the shift into the frame per axis
        if self.velocity:  # (class SHIFTS: unknown)
            self.velocity_embed = nn.Embedding(2 * (SHIFTS + 1), D)
        init_weights(self)
        for new in ("prior_embed", "velocity_embed"):  # zero: a model continued with warp on starts as it was
            if hasattr(self, new):
                nn.init.zeros_(getattr(self, new).weight)
        self.register_buffer("slot", torch.arange(self.G) * (vocab + 1), persistent=False)
        self._frozen: Frozen | None = None  # attached for training; a plain object, so not part of the weights

    def attach(self, tokenizer: nn.Module, lam: nn.Module) -> None:
        """Frozen tokenizer and LAM that turn training frames into codes and latent actions."""
        self._frozen = Frozen(tokenizer.eval().requires_grad_(False), lam.eval().requires_grad_(False))

    # -- embedding ------------------------------------------------------------------------------
    def _embed(self, codes_BTNG, actions_BT, masked: bool, prior_BTNG=None) -> torch.Tensor:
        x = self.code_embed(codes_BTNG + self.slot).sum(-2)  # (B, T, N, D)
        if masked:
            x = x + self.target
        if prior_BTNG is not None:  # warp: the moved last frame's codes (B, T, N, G), or its pixels (B, T, H, W, C)
            y = self.prior_embed(pixel_patches(prior_BTNG, self.N) if self.pixels else prior_BTNG + self.slot)
            x = x + (y if self.pixels else y.sum(-2))
        a = self.action_embed(actions_BT)[:, :, None]  # (B, T, 1, D)
        return torch.cat([a, x], 2) if self.token_cond else x + a

    def _logits(self, h_BTND) -> torch.Tensor:
        h = h_BTND[:, :, -self.N :]
        return rearrange(self.head(h), "b t n (g v) -> b t n g v", g=self.G)

    def _shift_logits(self, h_BTND, actions_BT, last_BT2=None) -> torch.Tensor:
        """Logits (B, T, 2, SHIFTS) of the camera's shift (dx, dy) after each clean frame under the action taken;
        warp_velocity: given the class (B, T, 2) of the shift into that frame (SHIFTS: unknown)."""
        pooled = h_BTND[:, :, -self.N :].mean(2)
        if self.velocity:
            off = torch.tensor([0, SHIFTS + 1], device=pooled.device)  # each axis its own classes
            pooled = pooled + self.velocity_embed(last_BT2 + off).sum(-2)
        s = rearrange(self.shift_head(pooled), "b t (a k s) -> b t a k s", k=2, s=SHIFTS)
        return s.gather(2, actions_BT[:, :, None, None, None].expand(-1, -1, 1, 2, SHIFTS))[:, :, 0]

    # -- training -------------------------------------------------------------------------------
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The training loop's loss on a batch of frames (B, T, H, W, 3) and real actions (B, T-1): the frozen
        tokenizer makes the codes, and the frozen LAM the latent actions (a model on real actions keeps them)."""
        if self._frozen is None:
            raise RuntimeError("attach() the frozen tokenizer and LAM before training on frames")
        frames = batch["frames"]
        with torch.no_grad():
            codes = self._frozen.tokenizer.encode(frames)
            actions = batch["actions"] if self.real else self._frozen.lam.infer(frames)
            prior, shift = (
                training_priors(self, self._frozen.tokenizer, frames, codes) if self.cfg.warp else (None, None)
            )
        return self.code_loss(codes, actions, prior, shift)

    def code_loss(self, codes, actions, prior=None, shift=None) -> tuple[torch.Tensor, dict]:
        """MaskGIT's loss on codes (B, T, N, G) and the actions between their frames (B, T-1): cross-entropy of
        the masked codes of frames 2..T, at a mask rate drawn per frame from [mask_min, mask_max]. With warp's
        priors and shifts (_warp_targets), the shift head's cross-entropy is added."""
        actions = actions.to(codes.device)
        B, T = codes.shape[:2]
        if self.real and self.cfg.action_dropout > 0:  # some frames' actions unknown, as a caller's context may be
            unknown = torch.rand(actions.shape, device=codes.device) < self.cfg.action_dropout
            actions = actions.masked_fill(unknown, self.A)
        rate = torch.empty(B, T - 1, 1, 1, device=codes.device).uniform_(self.cfg.mask_min, self.cfg.mask_max)
        mask = torch.rand(B, T - 1, self.N, self.G, device=codes.device) < rate
        logits, target = self.teacher_forced_logits(codes, actions, mask, prior), codes[:, 1:]
        if shift is not None:
            logits, h = logits
        weight = mask.float()
        if self.cfg.changed_weight != 1.0:  # the codes that change are where an action shows
            weight = weight * torch.where(target != codes[:, :-1], self.cfg.changed_weight, 1.0)
        if torch.compiler.is_compiling():
            # Fixed shapes keep the compiled graph whole (indexing by the mask breaks it and waits for the GPU);
            # the compiler fuses the float32 upcast into the loss.
            w = weight.flatten()
            ce = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none")
            ce = (ce * w).sum() / w.sum()
            acc = ((logits.argmax(-1) == target).flatten().float() * mask.flatten()).sum() / mask.sum()
        else:
            # Only the masked codes' logits (M, V) go to float32: a float copy of all of them costs time.
            logits, target, w = logits[mask].float(), target[mask], weight[mask]  # (M, V), (M,), (M,)
            ce = (F.cross_entropy(logits, target, reduction="none") * w).sum() / w.sum()
            acc = (logits.argmax(-1) == target).float().mean()
        metrics = {"ce": ce.detach(), "acc": acc.detach()}  # tensors: the training loop reads them
        if shift is not None:  # the clean frames 1..T-1, each under the action that followed it
            s = self._shift_logits(h, actions, shifts_into(shift))  # (B, T-1, 2, SHIFTS)
            shift_ce = F.cross_entropy(s.flatten(0, -2).float(), shift_classes(shift).flatten())
            metrics |= {
                "shift_ce": shift_ce.detach(),
                "shift_acc": (s.argmax(-1) == shift_classes(shift)).all(-1).float().mean(),
            }
            ce = ce + shift_ce
        return ce, metrics

    def teacher_forced_logits(self, codes_BTNG, actions_BT, mask_BTNG, prior_BTNG=None):
        """Logits (B, T-1, N, G, V) for frames 2..T, each from the clean frames before it and its own
        codes masked where mask (B, T-1, N, G) is set; frame t+1 is conditioned on action a_t. With priors
        (B, T-1, N, G) for frames 2..T (warp): also the clean stream's output (B, T-1, N', D)."""
        T = codes_BTNG.shape[1]
        act_in = F.pad(actions_BT, (1, 0), value=self.A)  # frame t gets a_{t-1}
        masked = codes_BTNG[:, 1:].masked_fill(mask_BTNG, self.mask_id)
        x = torch.cat(
            [
                self._embed(codes_BTNG[:, :-1], act_in[:, :-1], False),
                self._embed(masked, act_in[:, 1:], True, prior_BTNG),
            ],
            1,
        )
        pos = torch.cat([torch.arange(T - 1), torch.arange(1, T)]).to(codes_BTNG.device)
        h = self.transformer(x, tmask=two_stream_mask(T, codes_BTNG.device), pos=pos)
        logits = self._logits(h[:, T - 1 :])
        return logits if prior_BTNG is None else (logits, h[:, : T - 1])

    # -- generation -----------------------------------------------------------------------------
    def start(self, codes_BCNG: torch.Tensor, actions_BC: torch.Tensor, last_shift_B2=None) -> Rollout:
        """Fill a key/value cache with context frames (B, C, N, G) and the actions that led to them (B, C);
        warp_velocity: the camera's shift (B, 2) into the last context frame, in pixels (None: unknown)."""
        caches = self.transformer.new_caches(self.cfg.seq_len - 1)
        C, dev = codes_BCNG.shape[1], codes_BCNG.device
        h = self.transformer(
            self._embed(codes_BCNG, actions_BC, False),
            tmask=window_mask(C, self.cfg.seq_len - 1, dev),
            pos=torch.arange(C, device=dev),
            caches=caches,
            commit=True,
        )
        unknown = torch.full((codes_BCNG.shape[0], 2), SHIFTS, device=dev)
        last = unknown if last_shift_B2 is None else shift_classes(last_shift_B2.to(dev))
        return Rollout(caches, C, last_h=h[:, -1:], last_shift=last.long(), carry=torch.zeros_like(unknown).float())

    @torch.no_grad()
    def next_shift(self, state: Rollout, action_B: torch.Tensor) -> torch.Tensor:
        """warp: the camera's shift (B, 2) after the last frame under `action_B`: the most likely per axis, or
        (warp_velocity) warp.owed_shift. The last generated frame joins the cache here, in a pass of its own."""
        if state.pending is not None:
            for c in state.caches:
                c.keep_last(self.cfg.seq_len - 2)
            x = self._embed(state.pending[0], state.pending[1][:, None], False)
            pos = torch.tensor([state.t - 1], device=action_B.device)
            state.last_h, state.pending = self.transformer(x, pos=pos, caches=state.caches, commit=True), None
        logits = self._shift_logits(state.last_h, action_B[:, None], state.last_shift[:, None])[:, 0].float()
        if not self.velocity:
            return logits.argmax(-1) - SHIFTS // 2
        shift, state.carry = owed_shift(logits, state.carry)
        state.last_shift = shift_classes(shift)
        return shift

    @torch.no_grad()
    def step(
        self,
        state: Rollout,
        action_B: torch.Tensor,
        steps: int | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate the next frame's codes (B, N, G) after taking latent action `action_B` (warp: given the codes
        (B, N, G) of the last frame moved by `next_shift`). The frame enters the key/value cache in the next
        call's first round."""
        steps = steps or self.cfg.maskgit_steps
        decode = self.cfg.decode if temperature is None else "sample"  # a temperature asked for means sampling
        temperature = self.cfg.temperature if temperature is None else temperature
        B, dev, t, caches, pending = action_B.shape[0], action_B.device, state.t, state.caches, state.pending
        codes = torch.full((B, 1, self.N, self.G), self.mask_id, dtype=torch.long, device=dev)
        if self.cfg.warp and prior is None:
            raise ValueError("a warp dynamics model steps on a prior: call next_shift, warp the last frame, encode it")
        x_prior = None if prior is None else prior[:, None]
        total = self.N * self.G
        for k in range(steps):
            x = self._embed(codes, action_B[:, None], True, x_prior)
            if k == 0 and pending is not None:  # the last frame joins the clean past in this pass
                for c in caches:
                    c.keep_last(self.cfg.seq_len - 2)
                x = torch.cat([self._embed(pending[0], pending[1][:, None], False), x], 1)
                h = self.transformer(x, pos=torch.tensor([t - 1, t], device=dev), caches=caches, commit=1)[:, 1:]
            else:
                h = self.transformer(x, pos=torch.tensor([t], device=dev), caches=caches)
            logits = self._logits(h)[:, 0].float()  # (B, N, G, V)
            if self.real and self.cfg.guidance != 1:  # the same frame under "unknown", after the pending frame joined
                x = self._embed(codes, torch.full_like(action_B, self.A)[:, None], True, x_prior)
                free = self._logits(self.transformer(x, pos=torch.tensor([t], device=dev), caches=caches))[:, 0].float()
                logits = free + self.cfg.guidance * (logits - free)
            sample, conf = self._pick(logits, decode, temperature, generator)  # (B, N, G) each
            known = codes[:, 0] != self.mask_id
            conf = conf.masked_fill(known, math.inf)  # known codes stay
            sample = torch.where(known, codes[:, 0], sample)
            still_masked = int(total * math.cos(math.pi / 2 * (k + 1) / steps))  # cosine schedule
            keep = total - still_masked
            order = conf.reshape(B, -1).argsort(-1, descending=True)
            chosen = torch.zeros(B, total, dtype=torch.bool, device=dev)
            chosen.scatter_(1, order[:, :keep], True)
            codes = torch.where(chosen.reshape(B, 1, self.N, self.G), sample[:, None], self.mask_id)
        state.pending, state.t = (codes, action_B), t + 1
        return codes[:, 0]

    def _pick(self, logits_BNGV: torch.Tensor, decode: str, temperature: float, generator):
        """A code for every position and slot (B, N, G), and the model's probability of it (maskgit.pick)."""
        return pick(logits_BNGV, decode, temperature, generator, self.levels)
