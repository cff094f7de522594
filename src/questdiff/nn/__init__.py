"""Modules that apply quantization parameters (they never produce them)."""
from .attention import QuantAttnProcessor
from .attention_joint import QuantFluxAttnProcessor, QuantJointAttnProcessor
from .layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLayerMixin,
    QuantLinear,
    is_quantizable,
    wrap_layer,
)
from .quantizer import ActQuantizer, WeightQuantizer

__all__ = [
    "ActQuantizer",
    "QuantAttnProcessor",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantFluxAttnProcessor",
    "QuantJointAttnProcessor",
    "QuantLayerMixin",
    "QuantLinear",
    "WeightQuantizer",
    "is_quantizable",
    "wrap_layer",
]
