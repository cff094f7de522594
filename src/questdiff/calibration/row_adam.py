"""Adam on some rows of per-timestep activation scales at a time.

An ``ActQuantizer.scale`` is one ``[T, C]`` Parameter; a forward uses one row, so only that row gets a gradient.
``torch.optim.Adam`` would still move every row that has momentum from earlier steps (zero gradient, non-zero
``m``), so rows trained at other timesteps would drift. ``RowAdam`` keeps Adam state per (parameter, row) and
updates only the rows of the step's batch (one row, or every row when a batch mixes timesteps), which is what the
official code's separate per-timestep Δ parameters with their own Adam amount to (spec §2.8).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..primitives import MIN_SCALE


class RowAdam:
    """Adam (torch's formula, no weight decay, no amsgrad) restricted to some rows of each ``[T, ...]`` parameter.

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

    def reset(self, rows: int | Sequence[int] | None = None) -> None:
        """Forget the moments of ``rows`` (all rows if ``None``): a fresh Adam, as the code builds per (epoch, t)."""
        index = slice(None) if rows is None else ([rows] if isinstance(rows, int) else list(rows))
        for m, v, s in zip(self.exp_avg, self.exp_avg_sq, self.steps):
            m[index] = 0
            v[index] = 0
            s[index] = 0

    @torch.no_grad()
    def step(self, rows: int | Sequence[int]) -> None:
        """Update ``rows`` of every parameter that has a gradient.

        Rows are grouped by their step count (they differ only when earlier steps trained other row sets); each
        group is one fused ``_foreach`` update over whole parameters (every row) or over per-row views."""
        rows = [rows] if isinstance(rows, int) else sorted(set(rows))
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not active or not rows:
            return
        for i in active:
            self.steps[i][rows] += 1
        groups: dict[int, list[int]] = {}
        for row in rows:  # every parameter of one optimizer sees the same rows, so parameter 0's counts stand for all
            groups.setdefault(int(self.steps[active[0]][row]), []).append(row)
        for count, group in groups.items():
            self._update(active, group, count)

    def _update(self, active: list[int], rows: list[int], count: int) -> None:
        beta1, beta2 = self.betas

        def views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            if len(rows) == tensors[0].shape[0]:
                return tensors
            return [t[r] for t in tensors for r in rows]

        params = views([self.params[i] for i in active])
        grads = views([self.params[i].grad for i in active])  # type: ignore[misc]
        exp_avg = views([self.exp_avg[i] for i in active])
        exp_avg_sq = views([self.exp_avg_sq[i] for i in active])
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**count))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, -self.lr / (1 - beta1**count))
        if self.min_value is not None:
            torch._foreach_clamp_min_(params, self.min_value)
