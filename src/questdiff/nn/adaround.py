"""AdaRound weight quantizer (spec §2.5): learned per-element rounding on top of a ``WeightQuantizer``'s frozen
scale and zero point. It only applies parameters; ``questdiff.calibration.adaround`` initialises and trains them.

Two modes:
- soft (during reconstruction): ``q = clamp(floor(w / s) + h(alpha) + z, qmin, qmax)`` with the rectified sigmoid
  ``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``; ``alpha`` is a Parameter shaped like the
  weight (``view`` layout, i.e. ``[C_out, G, group]`` for per-group weights);
- hard (after reconstruction, and what checkpoints hold): ``q = clamp(floor(w / s) + round_up + z, qmin, qmax)``
  with ``round_up = 1[alpha >= 0]`` a bool buffer (1 byte per weight, not 4).

In both modes ``floor`` is straight-through w.r.t. the weight, so QuEST's finetuning stages can train the latent
weight under the frozen rounding decisions (spec §2.8; the official code's hard forward does the same).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import WeightSpec
from ..primitives import grid_dtype
from .quantizer import WeightQuantizer

ZETA = 1.1
GAMMA = -0.1


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor with a straight-through gradient (identity in backward)."""
    return x + (torch.floor(x) - x).detach()


def rectified_sigmoid(alpha: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``, elementwise, same shape."""
    return torch.clamp(torch.sigmoid(alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def _view_shape(weight_shape: tuple[int, ...], spec: WeightSpec) -> tuple[int, ...]:
    if spec.granularity != "group":
        return tuple(weight_shape)
    assert spec.group_size is not None
    k = 1
    for d in weight_shape[1:]:
        k *= d
    return (weight_shape[0], k // spec.group_size, spec.group_size)


class AdaRoundQuantizer(WeightQuantizer):
    """``WeightQuantizer`` with learned rounding. Built in hard mode with ``round_up = False`` everywhere (the
    structure a checkpoint loads into); ``set_soft(alpha)`` switches to soft mode, ``harden()`` back.

    Buffers: ``scale``, ``zero_point`` (inherited, frozen), ``round_up`` (bool, ``view`` shape).
    Parameter (soft mode only): ``alpha`` (float, ``view`` shape).
    """

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], spec: WeightSpec, zeta: float = ZETA, gamma: float = GAMMA) -> None:
        super().__init__(weight_shape, spec)
        self.zeta = zeta
        self.gamma = gamma
        self.register_buffer("round_up", torch.zeros(_view_shape(self.weight_shape, spec), dtype=torch.bool))
        self.register_parameter("alpha", None)

    @classmethod
    def from_quantizer(cls, quantizer: WeightQuantizer, zeta: float = ZETA, gamma: float = GAMMA) -> AdaRoundQuantizer:
        """Hard-mode AdaRound quantizer with ``quantizer``'s spec, scale, zero point, device and enabled flag."""
        new = cls(quantizer.weight_shape, quantizer.spec, zeta, gamma).to(quantizer.scale.device)
        with torch.no_grad():
            new.scale.copy_(quantizer.scale)
            new.zero_point.copy_(quantizer.zero_point)
        new.enabled = quantizer.enabled
        return new

    @property
    def soft(self) -> bool:
        return self.alpha is not None

    def set_soft(self, alpha: torch.Tensor) -> nn.Parameter:
        """Enter soft mode with rounding logits ``alpha`` (``view`` shape); returns the trainable Parameter."""
        if tuple(alpha.shape) != tuple(self.round_up.shape):
            raise ValueError(f"alpha of shape {tuple(alpha.shape)} does not match the weight view {tuple(self.round_up.shape)}")
        self.alpha = nn.Parameter(alpha.detach().clone().float().to(self.scale.device))
        return self.alpha

    def rounding(self) -> torch.Tensor:
        """``h(alpha)`` in soft mode, the 0/1 decisions in hard mode (``view`` shape, float)."""
        if self.alpha is not None:
            return rectified_sigmoid(self.alpha, self.zeta, self.gamma)
        return self.round_up.float()

    @torch.no_grad()
    def harden(self) -> None:
        """Freeze the rounding: ``round_up = alpha >= 0`` and drop ``alpha``."""
        if self.alpha is None:
            return
        self.round_up.copy_(self.alpha >= 0)
        self.alpha = None

    def quantize_view(self, w: torch.Tensor) -> torch.Tensor:
        dtype = grid_dtype(w.dtype)  # integers from the exact fp32 weight, as WeightQuantizer (primitives)
        scale, zero_point = self.scale.to(dtype), self.zero_point.to(dtype)
        q = torch.clamp(floor_ste(w.to(dtype) / scale) + self.rounding().to(dtype) + zero_point, self.qmin, self.qmax)
        return ((q - zero_point) * scale).to(w.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", adaround={'soft' if self.soft else 'hard'}"
