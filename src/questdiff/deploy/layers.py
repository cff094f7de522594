"""Deployed Linear / Conv1d / Conv2d: the fake-quant layers' integer form, run on ``questdiff.kernels``.

A deployed layer holds no float weight: only the codes and tables of its ``QuantizedOperand`` (two for split skip
convs, whose second half is added as the first half's residual in the GEMM epilogue) and the bias. ``backend``
picks the kernels: ``"auto"`` runs Triton where it can (CUDA) and the pure-torch reference elsewhere,
``"reference"`` always runs the reference. A layer whose fake-quant twin rotates its input channels
(``ActivationSpec.rotation``) keeps that ``ChannelRotation``: its weight codes are of the rotated weight, and it
rotates its input (a float matmul per channel block) before taking the activation codes.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops
from ..nn.rotation import ChannelRotation
from .operand import QuantizedOperand

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")


class DeployedLayer(nn.Module):
    """Base class: operands over consecutive input-channel ranges, summed, plus the bias.

    Args:
        operands: one per input segment (split skip convs have two).
        split: first channel of the second segment (0 = one segment).
        bias: ``[N]`` or ``None``.
        backend: ``"auto"`` / ``"triton"`` / ``"reference"``.
        rotation: the input-channel rotation applied before quantization (``None``: none).
    """

    kind = "layer"
    channel_dim = 1

    def __init__(self, operands: list[QuantizedOperand], split: int, bias: torch.Tensor | None,
                 backend: Backend, rotation: ChannelRotation | None = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        self.operands = nn.ModuleList(operands)
        self.split = split
        self.backend = backend
        self.rotation = rotation
        self.register_buffer("bias", bias)

    def geometry(self) -> dict[str, Any]:
        """JSON-able hyper-parameters (overridden by convs)."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "split": self.split, "has_bias": self.bias is not None,
                "geometry": self.geometry(), "operands": [op.spec() for op in self.operands],
                "rotation": None if self.rotation is None else self.rotation.spec()}

    @property
    def runs_kernels(self) -> bool:
        return all(op.runs_kernels for op in self.operands) and self._geometry_fits_kernels()

    def _geometry_fits_kernels(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_triton = ops.triton_runs_on(x.device, self.backend)
        kernels = self.runs_kernels
        if self.rotation is not None:
            x = self.rotation(x)
        parts = [x] if not self.split else list(torch.split(x, [self.split, x.shape[self.channel_dim] - self.split],
                                                            dim=self.channel_dim))
        y = None
        for i, (operand, part) in enumerate(zip(self.operands, parts)):
            bias = self.bias if i == 0 else None
            if kernels:
                y = self._kernel(operand, part, bias, y, use_triton)
            else:
                out = self._float_op(operand.act.fake_quantize(part, self.channel_dim),
                                     self._weight(operand).to(part.dtype), bias)
                y = out if y is None else y + out
        assert y is not None
        return y

    def _weight(self, operand: QuantizedOperand) -> torch.Tensor:
        raise NotImplementedError

    def _float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _kernel(self, operand: QuantizedOperand, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, use_triton: bool) -> torch.Tensor:
        raise NotImplementedError


class DeployedLinear(DeployedLayer):
    """``nn.Linear`` on int8 codes (``x [..., K]``)."""

    kind = "linear"
    channel_dim = -1

    def __init__(self, in_features: int, out_features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.in_features, self.out_features = in_features, out_features

    def geometry(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _weight(self, operand: QuantizedOperand) -> torch.Tensor:
        return operand.dequantized_weight().reshape(self.out_features, -1)

    def _float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _kernel(self, operand: QuantizedOperand, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, use_triton: bool) -> torch.Tensor:
        return operand.linear(x, bias, residual, use_triton)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


class DeployedConv(DeployedLayer):
    """``nn.Conv1d`` / ``nn.Conv2d`` on int8 codes. 2-D convs with zero padding and one group run the implicit-GEMM
    kernel; the others simulate."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 stride: tuple[int, ...], padding: tuple[int, ...] | str, dilation: tuple[int, ...], groups: int,
                 padding_mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dims = dims
        self.kind = f"conv{dims}d"
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.groups, self.padding_mode = groups, padding_mode

    def geometry(self) -> dict[str, Any]:
        return {"dims": self.dims, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "padding_mode": self.padding_mode}

    def _geometry_fits_kernels(self) -> bool:
        return self.dims == 2 and self.groups == 1 and self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def _weight(self, operand: QuantizedOperand) -> torch.Tensor:
        w = operand.dequantized_weight()  # [N, taps, C]
        return w.permute(0, 2, 1).reshape(self.out_channels, operand.channels, *self.kernel_size)

    def _float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = F.conv2d if self.dims == 2 else F.conv1d
        if self.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={self.padding_mode!r} is not supported by deployed convs")
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _kernel(self, operand: QuantizedOperand, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, use_triton: bool) -> torch.Tensor:
        return operand.conv2d(x, bias, residual, self.kernel_size, self.stride, self.padding,  # type: ignore[arg-type]
                              self.dilation, use_triton)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, backend={self.backend}")
