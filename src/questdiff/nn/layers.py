"""Fake-quant Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d: quantize the input activation and the weight, then
run the original op.

They subclass the torch layers (so ``isinstance(m, nn.Linear)`` stays true for diffusers/LoRA code) and reuse
the original Parameter objects. With both quantizers disabled the forward is the torch layer's own forward,
bit for bit (up to float rounding once a smoothing or rotation is folded into the weight). Subclasses of these torch layers are wrapped too when they keep the torch forward (their math is the
torch layer's); a subclass with a forward of its own is not (replacing it would change what it computes).

Weight quantizers see the weight output channels first, ``[C_out, C_in/groups, *k]`` (``quant_layout``): that is
how Linear and Conv store it; a transposed conv stores ``[C_in, C_out/groups, *k]`` and is viewed with its in/out
axes swapped, so "per output channel" means the same for every layer.

Split inputs (spec §2.3): a skip conv of an up block sees ``cat([decoder_feature, skip_feature], dim=1)``; with
``split > 0`` the channels ``[:split]`` and ``[split:]`` get separate activation and weight quantizers.

Rotated inputs (``ActivationSpec.rotation``): ``rotate_inputs`` multiplies the weight's input-channel axis by an
orthogonal ``R`` once, in place, and from then on the layer multiplies its input by ``R`` before the activation
quantizer (which thus sees, and is calibrated on, the rotated input); the float output is unchanged.
Smoothed inputs (``ActivationSpec.smoothing``): ``smooth_inputs`` divides the input channels by a calibrated ``s``
(``nn/smoothing.py``) and multiplies the weight's input-channel axis by it, before the rotation if both are set.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .quantizer import ActQuantizer, WeightQuantizer
from .rotation import ChannelRotation
from .smoothing import ChannelSmoothing, per_weight_column


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
    rotation: Optional[ChannelRotation]
    smoothing: Optional[ChannelSmoothing]

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
        self.add_module("rotation", None)  # type: ignore[attr-defined]  # set by ``rotate_inputs``
        self.add_module("smoothing", None)  # type: ignore[attr-defined]  # set by ``prepare``, filled by ``smooth_inputs``

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

    @torch.no_grad()
    def rotate_inputs(self, rotation: ChannelRotation) -> None:
        """Rotate the input channels by ``rotation``'s ``R``: the weight now, in place (``W <- W R`` on its
        input-channel axis, computed in fp32), the input in every forward. Once per layer, before calibration."""
        if self.rotation is not None or self.fp_weight is not None:
            raise ValueError("the layer is already rotated or calibrated: rotate a freshly prepared layer only")
        if getattr(self, "groups", 1) != 1:
            raise ValueError("grouped convolutions cannot rotate their input channels (R would mix the groups)")
        w = quant_layout(self, self.weight)  # type: ignore[arg-type]
        rotated = rotation.to(w.device).rotate(w.float(), 1).to(w.dtype)
        self.weight.copy_(quant_layout(self, rotated))  # type: ignore[arg-type]
        self.rotation = rotation

    @torch.no_grad()
    def smooth_inputs(self, s: torch.Tensor) -> None:
        """Divide the input channels by ``s [C_in]`` in every forward (``self.smoothing``, which ``prepare`` set) and
        multiply the weight's input-channel axis by it now, in place (in fp32, in the unrotated basis: ``W R`` becomes
        ``W diag(s) R``), so the float output is unchanged. Once per layer, before calibration."""
        if self.smoothing is None:
            raise ValueError("the layer was not prepared for smoothing (ActivationSpec.smoothing)")
        if self.fp_weight is not None or not torch.all(self.smoothing.scale == 1):
            raise ValueError("the layer is already smoothed or calibrated: smooth a freshly prepared layer only")
        w = quant_layout(self, self.weight).float()  # type: ignore[arg-type]
        if self.rotation is not None:
            w = self.rotation.to(w.device).unrotate(w, 1)
        column = per_weight_column(s.to(w.device).float(), w.shape[0], getattr(self, "groups", 1))
        w = w * column.view(*column.shape, *[1] * (w.ndim - 2))
        if self.rotation is not None:
            w = self.rotation.rotate(w, 1)
        self.weight.copy_(quant_layout(self, w.to(self.weight.dtype)))  # type: ignore[arg-type]
        self.smoothing.scale.copy_(s)

    # -- forward -----------------------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The (smoothed, rotated, then) fake-quantized input."""
        if self.smoothing is not None:
            x = self.smoothing(x)
        if self.rotation is not None:
            x = self.rotation(x)
        if not self.split:
            return self.act_quantizer(x)
        assert self.act_quantizer_skip is not None
        return torch.cat([self.act_quantizer(x[:, : self.split]), self.act_quantizer_skip(x[:, self.split :])], dim=1)

    def weight_halves(self) -> list[tuple[str, torch.Tensor]]:
        """``(quantizer attribute, weight part)`` pairs, each part in the quantizer's layout (``quant_layout``): the
        whole weight, or for a split layer its input channels ``[:split]`` and ``[split:]``."""
        w = quant_layout(self, self.weight)  # type: ignore[arg-type]
        if not self.split:
            return [("weight_quantizer", w)]
        return [("weight_quantizer", w[:, : self.split]), ("weight_quantizer_skip", w[:, self.split :])]

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight in the layer's own storage layout."""
        parts = [getattr(self, attr)(w) for attr, w in self.weight_halves()]
        return quant_layout(self, parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``args``/``kwargs``: the torch layer's extra forward arguments (a transposed conv's ``output_size``)."""
        x = self.quantize_input(x)
        if self.weight_quantizer.enabled:
            weight = self.frozen_qweight if self.frozen_qweight is not None else self.quantized_weight()
            return self._run(x, weight, self.bias, *args, **kwargs)
        if self.fp_weight is not None:
            return self._run(x, self.fp_weight, self.fp_bias, *args, **kwargs)
        return self._run(x, self.weight, self.bias, *args, **kwargs)

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class QuantLinear(QuantLayerMixin, nn.Linear):
    """Fake-quant ``nn.Linear``; the activation channel is the last dim."""

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, weight, bias)


class _QuantConv(QuantLayerMixin):
    """Fake-quant ``nn.ConvNd``; the activation channel is dim 1."""

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]


class QuantConv1d(_QuantConv, nn.Conv1d):
    pass


class QuantConv2d(_QuantConv, nn.Conv2d):
    pass


class QuantConv3d(_QuantConv, nn.Conv3d):
    pass


class _QuantConvTranspose(QuantLayerMixin):
    """Fake-quant ``nn.ConvTransposeNd`` (up-sampling); the activation channel is dim 1."""

    _op: Any

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             output_size: Optional[list[int]] = None) -> torch.Tensor:
        # the torch forward's own output-padding rule, for the same output_size argument
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,  # type: ignore[attr-defined]
                                              len(self.kernel_size), self.dilation)  # type: ignore[attr-defined]
        return type(self)._op(x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation)  # type: ignore[attr-defined]


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    _op = F.conv_transpose1d


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    _op = F.conv_transpose2d


class QuantConvTranspose3d(_QuantConvTranspose, nn.ConvTranspose3d):
    _op = F.conv_transpose3d


QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
}
QUANTIZABLE_TYPES = tuple(QUANT_CLASSES)


def quant_class(module: nn.Module) -> type[nn.Module] | None:
    """The fake-quant class for ``module``: that of its torch base class when ``module`` is a Linear/Conv/ConvTranspose
    or a subclass keeping the torch forward; ``None`` for anything else, a subclass with a forward of its own, or a
    layer already wrapped."""
    if isinstance(module, QuantLayerMixin):
        return None
    for base in type(module).__mro__:
        if base in QUANT_CLASSES:
            return QUANT_CLASSES[base] if type(module).forward is base.forward else None
    return None


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``wrap_layer`` can wrap ``module`` (see ``quant_class``)."""
    return quant_class(module) is not None


def holds_quant_layer(module: nn.Module) -> bool:
    """Whether ``module`` is, or contains, a layer that is quantizable or already wrapped."""
    return any(isinstance(m, QuantLayerMixin) or is_quantizable(m) for m in module.modules())


def swap_io(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[A, B/groups, *k]`` <-> ``[B, A/groups, *k]`` (a transposed conv's weight <-> its output-major view)."""
    return weight.unflatten(0, (groups, -1)).transpose(1, 2).flatten(0, 1)


def quant_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` of ``module`` in the weight quantizer's layout, output channels first ``[C_out, C_in/groups, *k]``,
    or back: the identity, except for transposed convs (whose in/out axes it swaps; applying it twice restores the
    weight)."""
    if isinstance(module, _ConvNd) and module.transposed:
        return swap_io(weight, module.groups)
    return weight


def wrap_layer(
    module: nn.Module,
    weight_quantizer: WeightQuantizer,
    act_quantizer: ActQuantizer,
    split: int = 0,
    weight_quantizer_skip: WeightQuantizer | None = None,
    act_quantizer_skip: ActQuantizer | None = None,
) -> QuantLayerMixin:
    """Fake-quant twin of ``module`` sharing its Parameters (no weight copy). ``weight_quantizer`` is shaped for
    ``quant_layout(module, module.weight)``."""
    cls = quant_class(module)
    if cls is None:
        raise TypeError(
            f"cannot quantize {type(module).__name__}: only Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d (or "
            "subclasses that keep their forward) are supported"
        )
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
