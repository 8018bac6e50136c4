"""Optimisation: the learning-rate schedule, AdamW with decay on matrices only, and the EMA of the weights."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from dfm import distributed as D
from dfm.checkpoint import CheckpointError
from dfm.training.config import OptimConfig


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """The learning rate of update `step` (0-based): linear warm-up, then constant or cosine down to min_lr."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (ndim >= 2) only, not on biases, norms and 1-d tables."""
    decay, no_decay = [], []
    for _, p in D.unwrap(module).named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


class EMA:
    """Exponential moving average of the trainable parameters, laid out like them (sharded under FSDP2)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        named = [(n, p) for n, p in D.unwrap(module).named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.warmup = decay, warmup

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, updates: int) -> None:
        w = 1 - self.decay_at(updates)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), w)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: D.to_full(s) for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"the checkpoint's EMA lacks {missing[:3]}; resume from a matching checkpoint")
        for n, s in zip(self.names, self.shadow):
            src = D._like(state[n], s)
            s.copy_(src)

    @contextlib.contextmanager
    def swapped(self):
        """The EMA weights in the live parameters for the duration (validation), then the trained ones back."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)
