"""What the one training loop asks of each of the three models: `loss(batch) -> (loss, metrics)`, a hook
before every step, and which parameters weight decay applies to."""

from __future__ import annotations

import torch
import torch.nn as nn


class StageModel(nn.Module):
    """The base of the tokenizer, the LAM and the dynamics model."""

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.loss(batch)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def set_step(self, step: int, total: int) -> None:
        """Called before each optimizer step; a model whose training changes over the run (the LAM's continuous
        warm-up) overrides it."""

    def decay_groups(self, weight_decay: float) -> list[dict]:
        """AdamW's parameter groups: matrices decay; vectors (biases, norms) do not, nor the tables that a module
        names in its NO_DECAY (learned positions, a VQ codebook), which decay would pull towards zero."""
        kept = {id(getattr(m, name)) for m in self.modules() for name in getattr(m, "NO_DECAY", ())}
        decay, rest = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and id(p) not in kept else rest).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
