"""Deployed Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d: the fake-quant layers' integer form, run on
``questdiff.kernels`` (every conv geometry is lowered onto the 2-D implicit-GEMM kernel, see ``DeployedConv``).

A deployed layer holds no float weight: only the codes and tables of its ``QuantizedOperand`` (two for split skip
convs, whose second half is added as the first half's residual in the GEMM epilogue) and the bias. ``backend``
picks the kernels: ``"auto"`` runs Triton where it can (CUDA) and the pure-torch reference elsewhere,
``"reference"`` always runs the reference. A layer whose fake-quant twin rotates its input channels
(``ActivationSpec.rotation``) keeps that ``ChannelRotation``: its weight codes are of the rotated weight, and it
rotates its input (a float matmul per channel block) before taking the activation codes. Likewise a smoothed layer
(``ActivationSpec.smoothing``) keeps its ``ChannelSmoothing``, divides its input by ``s`` first (an elementwise op,
which ``torch.compile`` fuses into the quantize step) and holds the codes of the smoothed weight.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops
from ..nn.layers import swap_io
from ..nn.rotation import ChannelRotation
from ..nn.smoothing import ChannelSmoothing
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
        smoothing: the input-channel smoothing applied before the rotation (``None``: none).
    """

    kind = "layer"
    channel_dim = 1

    def __init__(self, operands: list[QuantizedOperand], split: int, bias: torch.Tensor | None,
                 backend: Backend, rotation: ChannelRotation | None = None,
                 smoothing: ChannelSmoothing | None = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        self.operands = nn.ModuleList(operands)
        self.split = split
        self.backend = backend
        self.rotation = rotation
        self.smoothing = smoothing
        self.register_buffer("bias", bias)

    def geometry(self) -> dict[str, Any]:
        """JSON-able hyper-parameters (overridden by convs)."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "split": self.split, "has_bias": self.bias is not None,
                "geometry": self.geometry(), "operands": [op.spec() for op in self.operands],
                "rotation": None if self.rotation is None else self.rotation.spec(),
                "smoothing": None if self.smoothing is None else self.smoothing.spec()}

    @property
    def runs_kernels(self) -> bool:
        return all(op.runs_kernels for op in self.operands)

    def forward(self, x: torch.Tensor, **op_args: Any) -> torch.Tensor:
        """``op_args``: per-call arguments of the layer's op (a transposed conv's ``output_padding``)."""
        use_triton = ops.triton_runs_on(x.device, self.backend)
        kernels = self.runs_kernels
        if self.smoothing is not None:
            x = self.smoothing(x)
        if self.rotation is not None:
            x = self.rotation(x)
        parts = [x] if not self.split else list(torch.split(x, [self.split, x.shape[self.channel_dim] - self.split],
                                                            dim=self.channel_dim))
        y = None
        for i, (operand, part) in enumerate(zip(self.operands, parts)):
            bias = self.bias if i == 0 else None
            if kernels:
                y = self._kernel(operand, part, bias, y, use_triton, **op_args)
            else:
                out = self._float_op(operand.act.fake_quantize(part, self.channel_dim),
                                     self._weight(operand).to(part.dtype), bias, **op_args)
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


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class DeployedConv(DeployedLayer):
    """``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` on int8 codes, every geometry on the 2-D implicit-GEMM
    kernel (its zero padding holds the zero code, so real zeros put into the float input first quantize to it):

    - a transposed conv is the conv, stride 1, of its input with ``stride - 1`` zeros inserted between neighbours,
      padded by ``dilation * (k - 1) - padding`` (plus ``output_padding`` at the end; negative values crop), with
      the spatially flipped weight (``convert`` flips it) whose in/out channel axes are swapped;
    - padding the kernel cannot do (``padding_mode`` reflect / replicate / circular, ``'same'`` with an even
      kernel, a transposed conv's) is applied to the float input first: quantization is elementwise, so the codes
      of the padded input are the padded codes;
    - a Conv1d is a 2-D conv of height 1; a Conv3d is the sum over its depth taps of 2-D convs of the matching
      depth slices (batched over the output depth), chained through the kernel's residual epilogue;
    - a grouped conv runs one kernel call per group.

    Layers whose grids no GEMM applies (per-channel activations, per-group weight scales) simulate: they run the
    torch op on the dequantized input and weight.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 stride: tuple[int, ...], padding: tuple[int, ...] | str, dilation: tuple[int, ...], groups: int,
                 padding_mode: str, transposed: bool = False, output_padding: tuple[int, ...] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.split and groups != 1:
            raise ValueError("a split input (two operands) cannot feed a grouped conv")
        self.dims, self.transposed = dims, transposed
        self.kind = f"conv_transpose{dims}d" if transposed else f"conv{dims}d"
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.groups, self.padding_mode = groups, padding_mode
        self.output_padding = tuple(output_padding) if output_padding is not None else (0,) * dims

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any], **kwargs: Any) -> "DeployedConv":
        """Rebuild from ``geometry()`` (checkpoints; those written before transposed convs deployed lack its keys)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in geometry.items()}, **kwargs)

    def geometry(self) -> dict[str, Any]:
        return {"dims": self.dims, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "padding_mode": self.padding_mode,
                "transposed": self.transposed, "output_padding": list(self.output_padding)}

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """``output_size``: a transposed conv's target output size (as ``nn.ConvTranspose2d.forward``)."""
        if not self.transposed:
            if output_size is not None:
                raise ValueError("output_size applies to transposed convolutions only")
            return super().forward(x)
        # torch's own rule for the extra output rows; it reads self.output_padding only
        output_padding = nn.modules.conv._ConvTransposeNd._output_padding(
            self, x, output_size, list(self.stride), list(self._numeric_padding()),  # type: ignore[arg-type]
            list(self.kernel_size), self.dims, list(self.dilation))
        return super().forward(x, output_padding=tuple(output_padding))

    # -- geometry ----------------------------------------------------------------------------------------------
    def _numeric_padding(self) -> tuple[int, ...]:
        assert not isinstance(self.padding, str), "transposed convolutions take numeric padding only"
        return self.padding

    def _pads(self, output_padding: tuple[int, ...] | None) -> list[tuple[int, int]]:
        """``(before, after)`` padding of each spatial dim of the equivalent stride-or-dilation conv's input."""
        if self.transposed:
            assert output_padding is not None
            return [(d * (k - 1) - p, d * (k - 1) - p + op) for k, p, d, op in
                    zip(self.kernel_size, self._numeric_padding(), self.dilation, output_padding)]
        if self.padding == "valid":
            return [(0, 0)] * self.dims
        if self.padding == "same":  # torch's rule: the odd extra row/column goes after
            totals = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
            return [(t // 2, t - t // 2) for t in totals]
        return [(p, p) for p in self.padding]  # type: ignore[union-attr]

    def _lowered(self, x: torch.Tensor, output_padding: tuple[int, ...] | None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The float input of the equivalent plain conv and the symmetric zero padding left to the kernel (its last
        two spatial dims; everything else is padded here)."""
        if self.transposed:  # stride - 1 zeros between neighbours
            grown = x.new_zeros(*x.shape[:2], *[(n - 1) * s + 1 for n, s in zip(x.shape[2:], self.stride)])
            grown[(slice(None), slice(None), *[slice(None, None, s) for s in self.stride])] = x
            x = grown
        pads = self._pads(output_padding)
        kernel_pads = [0] * self.dims
        if self.padding_mode == "zeros":  # symmetric zero padding of the kernel's own dims: the kernel does it
            for i in range(max(0, self.dims - 2), self.dims):
                if pads[i][0] == pads[i][1] >= 0:
                    kernel_pads[i], pads[i] = pads[i][0], (0, 0)
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad order: last dim first
        if any(flat):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, flat, mode=mode)
        return x, tuple(kernel_pads)

    # -- kernels -----------------------------------------------------------------------------------------------
    def _kernel(self, operand: QuantizedOperand, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, use_triton: bool,
                output_padding: tuple[int, ...] | None = None) -> torch.Tensor:
        out_dtype = x.dtype
        x, kernel_pads = self._lowered(x, output_padding)
        # the model's memory format in and out (channels-last in: channels-last out; else NCHW, as cuDNN does)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        # the quantize step's per-pixel code sums serve a plain 2-D conv; split ones sum their own slices
        direct = self.dims == 2 and self.groups == 1
        codes, sums = operand.act.tokens(x, True, operand.weight_offset_used and direct, use_triton)
        stride = (1,) * self.dims if self.transposed else self.stride
        if self.dims == 1:  # a 2-D conv of height 1
            y = self._conv2d(operand, codes[:, :, None], None, bias,
                             None if residual is None else residual[:, :, None], slice(None), (1, *self.kernel_size),
                             (1, *stride), (0, *kernel_pads), (1, *self.dilation), out_dtype, False, use_triton)
            return y[:, :, 0]
        if self.dims == 2:
            return self._conv2d(operand, codes, sums, bias, residual, slice(None), self.kernel_size, stride,
                                kernel_pads, self.dilation, out_dtype, channels_last, use_triton)
        return self._conv3d(operand, codes, bias, residual, stride, kernel_pads, out_dtype, use_triton)

    def _conv3d(self, operand: QuantizedOperand, codes: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, stride: tuple[int, ...], kernel_pads: tuple[int, ...],
                out_dtype: torch.dtype, use_triton: bool) -> torch.Tensor:
        """Sum over the depth taps ``j`` of the 2-D convs of the depth slices ``j * dilation + stride * [0, Do)``
        (codes ``[B, C, D, H, W]``, depth already padded), each with weight taps ``[j kh kw, (j + 1) kh kw)``."""
        (kd, kh, kw), (sd, *hw_stride), (dd, *hw_dilation) = self.kernel_size, stride, self.dilation
        batch, depth = codes.shape[0], codes.shape[2]
        out_depth = (depth - dd * (kd - 1) - 1) // sd + 1
        y = None if residual is None else residual.transpose(1, 2).flatten(0, 1)  # [B * Do, N, Ho, Wo]
        for j in range(kd):
            start = j * dd
            part = codes[:, :, start:start + (out_depth - 1) * sd + 1:sd].transpose(1, 2).flatten(0, 1)
            y = self._conv2d(operand, part, None, bias if j == 0 else None, y, slice(j * kh * kw, (j + 1) * kh * kw),
                             (kh, kw), tuple(hw_stride), kernel_pads[1:], tuple(hw_dilation), out_dtype, False,
                             use_triton)
        assert y is not None
        return y.unflatten(0, (batch, out_depth)).transpose(1, 2)

    def _conv2d(self, operand: QuantizedOperand, codes: torch.Tensor, sums: torch.Tensor | None,
                bias: torch.Tensor | None, residual: torch.Tensor | None, taps: slice, kernel: tuple[int, ...],
                stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...], out_dtype: torch.dtype,
                channels_last: bool, use_triton: bool) -> torch.Tensor:
        """One kernel call per group: input channels and output channels (weight rows) split ``groups`` ways
        (``sums``: the per-pixel code sums of the whole ``codes``, one group only)."""
        channels, rows = codes.shape[1] // self.groups, operand.weight.shape[0] // self.groups
        outs = []
        for g in range(self.groups):
            out_rows = slice(g * rows, (g + 1) * rows)
            outs.append(operand.conv2d(
                codes[:, g * channels:(g + 1) * channels], sums, None if bias is None else bias[out_rows],
                None if residual is None else residual[:, out_rows], kernel, stride,  # type: ignore[arg-type]
                padding, dilation, out_dtype, channels_last, use_triton,  # type: ignore[arg-type]
                rows=out_rows, taps=taps))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    # -- simulation --------------------------------------------------------------------------------------------
    def _weight(self, operand: QuantizedOperand) -> torch.Tensor:
        """The dequantized weight in the torch layer's own layout."""
        w = operand.dequantized_weight()  # [N, taps, C] channels last, or [N, 1, C * taps] for per-group weights
        w = w.permute(0, 2, 1).reshape(w.shape[0], -1, *self.kernel_size)  # [N, C, *kernel] either way
        if not self.transposed:
            return w
        if operand.weight_scale.shape[1] == 1:  # convert flips channels-last transposed weights (see _operand)
            w = w.flip(dims=tuple(range(2, w.ndim)))
        return swap_io(w, self.groups)

    def _float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  output_padding: tuple[int, ...] | None = None) -> torch.Tensor:
        if self.transposed:
            return _CONV_TRANSPOSE[self.dims](x, weight, bias, self.stride, self.padding, output_padding, self.groups,
                                              self.dilation)
        if self.padding_mode != "zeros":  # torch's conv forward: pad first, then convolve without padding
            flat = [p for pair in reversed(self._pads(None)) for p in pair]
            return _CONV[self.dims](F.pad(x, flat, mode=self.padding_mode), weight, bias, self.stride, 0,
                                    self.dilation, self.groups)
        return _CONV[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}{', transposed' if self.transposed else ''}, groups={self.groups}, "
                f"backend={self.backend}")
