"""Several players' rollouts stepped as one batch: one dynamics call and one decoder call per tick for every
player who is due, instead of one of each per player.

Each player keeps its own `session.Session` (its key/value caches, its last frame). A tick stacks the due
sessions' per-rollout state along the batch axis, steps the stacked Session once, and splits the new state
back into the players' sessions. Rows may share a call when two things agree:
- the shapes of their state: a player who joined lately caches fewer frames until its window fills, so
  sessions are grouped by `signature` (a new player steps alone, or with other new ones, for a few frames);
- the time index. Temporal attention uses rotary positions, and a cache holds keys already rotated to their
  frames' positions. Rotary scores depend only on differences of positions, so a session moved to another
  clock (every cached key turned by the same offset: `rebase`) attends exactly as before, up to float
  rounding. A group's sessions are moved to its latest clock.
A group that comes back unchanged the next tick (the same players, none stepped on its own in between: the
hub's usual tick) steps the stacked state it left, without stacking again (`Together`): stacking copies every
cached key and value: four players' call took 77-80 instead of 83-89 ms through the server on a 2-core CPU.
Sampling models (decode='sample' with a temperature) draw a group's codes from its first session's generator,
so a batched player's samples differ from those it would draw alone; expected-level decoding (the bundled
models) draws nothing, and a batched player's frames are the ones it would get alone, up to the rounding of bf16
products, which depends on the batch's shape (in bf16 a code may then be picked the other way).

Letters: B batch (players), N tokens per frame, H heads, S cached frames, K head size.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import torch

from procgenie.nn.blocks import KVCache, apply_rotary, rotary
from procgenie.session import Session

SCALARS = (int, float, bool, str, type(None))  # per-rollout numbers (the time index): equal in a group


def signature(value):
    """What must match for states to stack: shapes past the batch axis, dtypes, which parts exist."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape[1:]), value.dtype
    if isinstance(value, KVCache):  # k (B*N, H, S, K): S, the cached frames, must match
        return None if value.k is None else (tuple(value.k.shape[1:]), value.k.dtype)
    if dataclasses.is_dataclass(value):
        return tuple(signature(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return tuple(signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, signature(v)) for k, v in sorted(value.items()))
    return None  # numbers (equal after `rebase`) and objects the hub's sessions share or keep (a generator)


def _caches(value):
    """Every KVCache in a state."""
    if isinstance(value, KVCache):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _caches(v)


def rebase(session: Session, t: int) -> None:
    """Move a session's clock to time index t: each cached key (B*N, H, S, K) turned by t - its t."""
    d = t - session.state.t
    if d == 0:
        return
    for cache in _caches([session.state.caches, session.dec_caches]):
        if cache.k is not None:
            cos, sin = rotary(torch.tensor([d], device=cache.k.device), cache.k.shape[-1])  # (1, K) each
            cache.k, cache.pos = apply_rotary(cache.k, cos, sin), cache.pos + d
    session.state.t = t


def merge(values: list):
    """The states of several rollouts -> one state whose batch axis holds them in order."""
    v0 = values[0]
    if isinstance(v0, torch.Tensor):
        return torch.cat(values)
    if isinstance(v0, KVCache):  # keys and values stack by row; positions are the group's clock
        if v0.k is None:
            return KVCache(max_len=v0.max_len)
        return KVCache(merge([c.k for c in values]), merge([c.v for c in values]), v0.pos, v0.max_len)
    if dataclasses.is_dataclass(v0):
        return type(v0)(**{f.name: merge([getattr(v, f.name) for v in values]) for f in dataclasses.fields(v0)})
    if isinstance(v0, (list, tuple)):
        return type(v0)(merge(list(column)) for column in zip(*values))
    return v0  # a number shared by the group, or an object every row shares


def split(merged, originals: list, rows: list[int]) -> list:
    """The inverse of `merge` after a step: one state per rollout of `rows[i]` rows. Numbers come from the
    merged state (the new time index); other objects (a session's generator) stay each rollout's own."""
    n = len(originals)
    if isinstance(merged, torch.Tensor):
        per = merged.shape[0] // sum(rows)  # cache rows are (B N): N rows per batch row
        return list(torch.split(merged, [per * r for r in rows]))
    if isinstance(merged, KVCache):
        if merged.k is None:
            return [KVCache(max_len=merged.max_len) for _ in range(n)]
        ks, vs = split(merged.k, originals, rows), split(merged.v, originals, rows)
        return [KVCache(k, v, merged.pos, merged.max_len) for k, v in zip(ks, vs)]
    if dataclasses.is_dataclass(merged):
        names = [f.name for f in dataclasses.fields(merged)]
        cols = {a: split(getattr(merged, a), [getattr(o, a) for o in originals], rows) for a in names}
        return [type(merged)(**{a: cols[a][i] for a in names}) for i in range(n)]
    if isinstance(merged, (list, tuple)):
        same = all(isinstance(o, (list, tuple)) and len(o) == len(merged) for o in originals)
        cols = [split(m, [o[j] for o in originals] if same else [m] * n, rows) for j, m in enumerate(merged)]
        return [type(merged)(c[i] for c in cols) for i in range(n)]
    return [merged] * n if isinstance(merged, SCALARS) else originals


def _leaves(value):
    """The objects a state is made of (tensors, numbers, shared objects), in a fixed order: two states with the same
    leaves (tensors by identity, numbers by value) are the same state."""
    if isinstance(value, (list, tuple, dict)) or dataclasses.is_dataclass(value):  # a KVCache is a dataclass
        items = (
            value.values()
            if isinstance(value, dict)
            else value
            if isinstance(value, (list, tuple))
            else (getattr(value, f.name) for f in dataclasses.fields(value))
        )
        for v in items:
            yield from _leaves(v)
    else:
        yield value


def _unchanged(session: Session, leaves: list) -> bool:
    now = list(_leaves(vars(session)))
    return len(now) == len(leaves) and all(
        a is b or (isinstance(a, SCALARS) and type(a) is type(b) and a == b) for a, b in zip(now, leaves)
    )


class Together:
    """Steps sessions together tick after tick (`step`), keeping each group's stacked state from one tick to the
    next: a group of the same sessions, none of them stepped on its own since, steps it again without stacking."""

    def __init__(self):
        self.kept: dict[tuple[Session, ...], tuple[Session, list]] = {}  # group -> (stacked, each one's leaves)

    def step(self, sessions: list[Session], actions: list[torch.Tensor]) -> list[np.ndarray]:
        """Step each session under its actions (B_i,), batching those whose states stack -> frames (B_i, H, W, 3)."""
        groups = defaultdict(list)
        for i, s in enumerate(sessions):
            groups[signature(vars(s))].append(i)
        frames: list[np.ndarray | None] = [None] * len(sessions)
        kept = {}
        for members in groups.values():
            if len(members) == 1:
                (i,) = members
                frames[i] = sessions[i].step(actions[i])
                continue
            group = tuple(sessions[i] for i in members)
            names = list(vars(group[0]))
            batch, leaves = self.kept.get(group, (None, None))
            if batch is None or not all(_unchanged(s, ls) for s, ls in zip(group, leaves)):
                t = max(s.state.t for s in group)
                for s in group:
                    rebase(s, t)
                batch = Session.__new__(Session)
                batch.__dict__.update({a: merge([vars(s)[a] for s in group]) for a in names})
            rows = [len(actions[i]) for i in members]
            out = batch.step(torch.cat([actions[i] for i in members]))  # (sum B_i, H, W, 3)
            parts = {a: split(vars(batch)[a], [vars(s)[a] for s in group], rows) for a in names}
            for j, (i, s) in enumerate(zip(members, group)):
                s.__dict__.update({a: parts[a][j] for a in names})
                frames[i] = out[sum(rows[:j]) : sum(rows[: j + 1])]
            kept[group] = batch, [list(_leaves(vars(s))) for s in group]
        self.kept = kept  # only this tick's groups: a player who left is let go
        return frames

    def forget(self) -> None:
        """Let go of every stacked state (a player left: its session is not kept alive until the next tick)."""
        self.kept = {}


def step_together(sessions: list[Session], actions: list[torch.Tensor]) -> list[np.ndarray]:
    """One tick of `Together` (nothing kept for the next)."""
    return Together().step(sessions, actions)
