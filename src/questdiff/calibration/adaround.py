"""AdaRound (spec §2.5): rounding logits initialised so that ``h(alpha) = frac(w / s)``, the rounding regulariser
with its annealed temperature, and the conversion of layers to ``AdaRoundQuantizer``.

``AdaRoundConfig`` holds the rounding objective's hyperparameters with the official code's defaults
(``qdiff/adaptive_rounding.py``, ``qdiff/block_recon.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import check_types
from ..nn import QuantLayerMixin, WeightQuantizer
from ..nn.adaround import GAMMA, ZETA, AdaRoundQuantizer

__all__ = [
    "AdaRoundConfig",
    "adaround_quantizers",
    "beta_at",
    "convert_layer",
    "init_alpha",
    "rounding_regularizer",
]


@dataclass(frozen=True)
class AdaRoundConfig:
    """Rounding objective.

    Attributes:
        zeta, gamma: stretch of the rectified sigmoid (code: 1.1, -0.1).
        reg_weight: weight of ``sum(1 - |2h - 1|^beta)`` (code: ``weight=0.01``).
        beta: temperature annealed from ``beta[0]`` to ``beta[1]`` (code: ``b_range=(20, 2)``).
        warmup: fraction of iterations without the regulariser, at ``beta[0]`` (code: 0.2).
    """

    zeta: float = ZETA
    gamma: float = GAMMA
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2

    def __post_init__(self) -> None:
        check_types(self)
        if not (self.zeta > 1.0 and self.gamma < 0.0):
            raise ValueError(f"AdaRound needs zeta > 1 and gamma < 0 (code: 1.1, -0.1), got {self.zeta}, {self.gamma}")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0 (code: 0.01), got {self.reg_weight}")
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise ValueError(f"beta must be a (start, end) pair of positive temperatures (code: (20, 2)), got {self.beta}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1) (code: 0.2), got {self.warmup}")


def init_alpha(weight: torch.Tensor, scale: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """Logits with ``h(alpha) = frac(w / s)``: ``alpha = -log((zeta - gamma) / (frac - gamma) - 1)``.

    ``weight`` in the quantizer's ``view`` layout, ``scale`` broadcastable to it; returns float32 of ``weight``'s shape.
    """
    x = weight.detach().float() / scale.float()
    frac = x - torch.floor(x)
    return -torch.log((zeta - gamma) / (frac - gamma) - 1.0)


def beta_at(step: int, iters: int, config: AdaRoundConfig) -> float:
    """Temperature at ``step`` of ``iters``: ``beta[0]`` during warm-up, then linear to ``beta[1]`` (``LinearTempDecay``)."""
    start = config.warmup * iters
    if step < start:
        return config.beta[0]
    rel = (step - start) / max(iters - start, 1)
    return config.beta[1] + (config.beta[0] - config.beta[1]) * max(0.0, 1.0 - rel)


def rounding_regularizer(quantizers: list[AdaRoundQuantizer], beta: float) -> torch.Tensor:
    """``sum over all elements of (1 - |2 h(alpha) - 1|^beta)`` over soft ``quantizers`` (scalar)."""
    terms = [(1.0 - (2.0 * q.rounding() - 1.0).abs().pow(beta)).sum() for q in quantizers]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def convert_layer(layer: QuantLayerMixin, soft: bool, config: AdaRoundConfig | None = None) -> list[AdaRoundQuantizer]:
    """Replace ``layer``'s weight quantizers by ``AdaRoundQuantizer``s (kept if already converted).

    ``soft=True`` initialises ``alpha`` from the current weight (``h = frac``) for reconstruction; ``soft=False``
    gives the hard structure with ``round_up = False`` (to be filled by a checkpoint). Returns the quantizers.
    """
    config = config or AdaRoundConfig()
    out = []
    for attr, weight in layer.weight_halves():
        quantizer: WeightQuantizer = getattr(layer, attr)
        if not isinstance(quantizer, AdaRoundQuantizer):
            quantizer = AdaRoundQuantizer.from_quantizer(quantizer, config.zeta, config.gamma)
            setattr(layer, attr, quantizer)
        if soft:
            quantizer.set_soft(init_alpha(quantizer.view(weight), quantizer.scale, quantizer.zeta, quantizer.gamma))
        out.append(quantizer)
    return out


def adaround_quantizers(module: nn.Module) -> list[AdaRoundQuantizer]:
    """Every ``AdaRoundQuantizer`` inside ``module``."""
    return [m for m in module.modules() if isinstance(m, AdaRoundQuantizer)]

