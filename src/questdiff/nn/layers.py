"""Fake-quant Conv1d / Conv2d / Linear: quantize the input activation and the weight, then run the original op.

They subclass the torch layers (so ``isinstance(m, nn.Linear)`` stays true for diffusers/LoRA code) and reuse
the original Parameter objects. With both quantizers disabled the forward is the torch layer's own forward,
bit for bit.

Split inputs (spec §2.3): a skip conv of an up block sees ``cat([decoder_feature, skip_feature], dim=1)``; with
``split > 0`` the channels ``[:split]`` and ``[split:]`` get separate activation and weight quantizers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from .quantizer import ActQuantizer, WeightQuantizer


class QuantLayerMixin:
    """Shared quantization logic; concrete classes provide ``_run(x, weight, bias)``."""

    weight: nn.Parameter
    bias: Optional[nn.Parameter]
    weight_quantizer: WeightQuantizer
    act_quantizer: ActQuantizer
    weight_quantizer_skip: Optional[WeightQuantizer]
    act_quantizer_skip: Optional[ActQuantizer]
    split: int
    fp_weight: Optional[torch.Tensor]
    fp_bias: Optional[torch.Tensor]
    frozen_qweight: Optional[torch.Tensor]

    def _attach(
        self,
        weight_quantizer: WeightQuantizer,
        act_quantizer: ActQuantizer,
        split: int = 0,
        weight_quantizer_skip: WeightQuantizer | None = None,
        act_quantizer_skip: ActQuantizer | None = None,
    ) -> None:
        if split and (weight_quantizer_skip is None or act_quantizer_skip is None):
            raise ValueError("a split layer needs quantizers for both input halves")
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.weight_quantizer_skip = weight_quantizer_skip
        self.act_quantizer_skip = act_quantizer_skip
        self.split = split
        # FP teacher copies, registered by finetuning stages only (non-persistent: never saved).
        self.register_buffer("fp_weight", None, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("fp_bias", None, persistent=False)  # type: ignore[attr-defined]
        # Fake-quantized weight held constant while the layer's weight is frozen (finetuning of other layers):
        # saves the per-step weight fake-quant kernels. Non-persistent, set only by ``freeze_quantized_weight``.
        self.register_buffer("frozen_qweight", None, persistent=False)  # type: ignore[attr-defined]

    # -- state -------------------------------------------------------------------------------------------------
    def weight_quantizers(self) -> list[WeightQuantizer]:
        return [q for q in (self.weight_quantizer, self.weight_quantizer_skip) if q is not None]

    def act_quantizers(self) -> list[ActQuantizer]:
        return [q for q in (self.act_quantizer, self.act_quantizer_skip) if q is not None]

    def set_quant_state(self, weight: bool, act: bool) -> None:
        for q in self.weight_quantizers():
            q.enabled = weight
        for q in self.act_quantizers():
            q.enabled = act

    @torch.no_grad()
    def keep_fp_copy(self) -> None:
        """Snapshot the current weights as the FP teacher's (used while weight quantization is off)."""
        self.fp_weight = self.weight.detach().clone()
        self.fp_bias = None if self.bias is None else self.bias.detach().clone()

    def drop_fp_copy(self) -> None:
        self.fp_weight = None
        self.fp_bias = None

    @torch.no_grad()
    def freeze_quantized_weight(self) -> None:
        """Compute the fake-quantized weight once and use it until ``thaw_quantized_weight`` (the weight and its
        quantizer must not change meanwhile)."""
        self.frozen_qweight = self.quantized_weight().detach()

    def thaw_quantized_weight(self) -> None:
        self.frozen_qweight = None

    # -- forward -----------------------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.act_quantizer(x)
        assert self.act_quantizer_skip is not None
        return torch.cat([self.act_quantizer(x[:, : self.split]), self.act_quantizer_skip(x[:, self.split :])], dim=1)

    def quantized_weight(self) -> torch.Tensor:
        if not self.split:
            return self.weight_quantizer(self.weight)
        assert self.weight_quantizer_skip is not None
        w = self.weight
        return torch.cat([self.weight_quantizer(w[:, : self.split]), self.weight_quantizer_skip(w[:, self.split :])], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if self.weight_quantizer.enabled:
            weight = self.frozen_qweight if self.frozen_qweight is not None else self.quantized_weight()
            return self._run(x, weight, self.bias)
        if self.fp_weight is not None:
            return self._run(x, self.fp_weight, self.fp_bias)
        return self._run(x, self.weight, self.bias)

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class QuantLinear(QuantLayerMixin, nn.Linear):
    """Fake-quant ``nn.Linear``; the activation channel is the last dim."""

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, weight, bias)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """Fake-quant ``nn.Conv2d``; the activation channel is dim 1."""

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class QuantConv1d(QuantLayerMixin, nn.Conv1d):
    """Fake-quant ``nn.Conv1d``; the activation channel is dim 1."""

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.Conv1d: QuantConv1d,
}
QUANTIZABLE_TYPES = tuple(QUANT_CLASSES)


def is_quantizable(module: nn.Module) -> bool:
    """Plain torch Linear/Conv1d/Conv2d (not already wrapped)."""
    return type(module) in QUANT_CLASSES


def wrap_layer(
    module: nn.Module,
    weight_quantizer: WeightQuantizer,
    act_quantizer: ActQuantizer,
    split: int = 0,
    weight_quantizer_skip: WeightQuantizer | None = None,
    act_quantizer_skip: ActQuantizer | None = None,
) -> QuantLayerMixin:
    """Fake-quant twin of ``module`` sharing its Parameters (no weight copy)."""
    cls = QUANT_CLASSES.get(type(module))
    if cls is None:
        raise TypeError(f"cannot quantize {type(module).__name__}: only Linear, Conv1d and Conv2d are supported")
    twin = cls.__new__(cls)
    nn.Module.__init__(twin)
    internals = set(vars(twin))
    for key, value in vars(module).items():  # hyper-parameters (stride, padding, in_features, ...)
        if key not in internals:
            object.__setattr__(twin, key, value)
    for name, param in module._parameters.items():  # the same Parameter objects
        twin.register_parameter(name, param)
    twin.train(module.training)
    twin._attach(weight_quantizer, act_quantizer, split, weight_quantizer_skip, act_quantizer_skip)  # type: ignore[attr-defined]
    return twin  # type: ignore[return-value]
