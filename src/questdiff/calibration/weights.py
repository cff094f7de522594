"""Weight quantizer initialisation: Lp (p = 2.4) shrink search or min-max, per output channel / tensor / group."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..fp8 import search_fp8_lp_shrink, search_fp8_minmax
from ..nn import WeightQuantizer
from ..primitives import search_lp_shrink, search_minmax
from ..prepare import quant_layers

logger = logging.getLogger(__name__)


def _axis(quantizer: WeightQuantizer) -> int | tuple[int, ...] | None:
    return {"tensor": None, "channel": 0, "group": (0, 1)}[quantizer.spec.granularity]


@torch.no_grad()
def init_weight_quantizer(quantizer: WeightQuantizer, weight: torch.Tensor) -> None:
    """Fill ``quantizer``'s scale/zero point from ``weight`` with its spec's search."""
    w = quantizer.view(weight.detach().float())
    spec = quantizer.spec
    if quantizer.fp8:
        search = search_fp8_lp_shrink if spec.scale_method == "lp" else search_fp8_minmax
        scale = search(w, axis=_axis(quantizer))
        quantizer.set_qparams(scale, torch.zeros_like(scale))
        return
    if spec.scale_method == "lp":
        scale, zero_point = search_lp_shrink(w, spec.bits, spec.symmetric, axis=_axis(quantizer))
    else:
        scale, zero_point = search_minmax(w, spec.bits, spec.symmetric, axis=_axis(quantizer))
    quantizer.set_qparams(scale, zero_point)


@torch.no_grad()
def init_weights(model: nn.Module) -> int:
    """Initialise every weight quantizer of a prepared ``model``; returns the number of layers."""
    layers = quant_layers(model)
    for layer in layers.values():
        for attr, weight in layer.weight_halves():
            init_weight_quantizer(getattr(layer, attr), weight)
    logger.info("initialised weight quantizers of %d layers", len(layers))
    return len(layers)
