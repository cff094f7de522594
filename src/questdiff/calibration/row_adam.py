"""Adam on one row of per-timestep activation scales at a time.

An ``ActQuantizer.scale`` is one ``[T, C]`` Parameter; a forward uses one row, so only that row gets a gradient.
``torch.optim.Adam`` would still move every row that has momentum from earlier steps (zero gradient, non-zero
``m``), so rows trained at other timesteps would drift. ``RowAdam`` keeps Adam state per (parameter, row) and
updates only the active row, which is what the official code's separate per-timestep Δ parameters with their own
Adam amount to (spec §2.8).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..primitives import MIN_SCALE


class RowAdam:
    """Adam (torch's formula, no weight decay, no amsgrad) restricted to one row of each ``[T, ...]`` parameter.

    Args:
        params: parameters shaped ``[T, ...]``.
        lr, betas, eps: as ``torch.optim.Adam``.
        min_value: rows are clamped to at least this after a step (scales must stay positive).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_value: float | None = MIN_SCALE,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.params = list(params)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.min_value = min_value
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p).detach() for p in self.params]
        self.steps = [torch.zeros(p.shape[0], dtype=torch.long) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reset(self, row: int | None = None) -> None:
        """Forget the moments of ``row`` (all rows if ``None``): a fresh Adam, as the code builds per (epoch, t)."""
        for m, v, s in zip(self.exp_avg, self.exp_avg_sq, self.steps):
            if row is None:
                m.zero_()
                v.zero_()
                s.zero_()
            else:
                m[row].zero_()
                v[row].zero_()
                s[row] = 0

    @torch.no_grad()
    def step(self, row: int) -> None:
        """Update row ``row`` of every parameter that has a gradient."""
        beta1, beta2 = self.betas
        for p, m, v, s in zip(self.params, self.exp_avg, self.exp_avg_sq, self.steps):
            if p.grad is None:
                continue
            g = p.grad[row]
            s[row] += 1
            t = int(s[row])
            m[row].mul_(beta1).add_(g, alpha=1 - beta1)
            v[row].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v[row].sqrt() / math.sqrt(1 - beta2**t)).add_(self.eps)
            p[row].addcdiv_(m[row], denom, value=-self.lr / (1 - beta1**t))
            if self.min_value is not None:
                p[row].clamp_(min=self.min_value)
