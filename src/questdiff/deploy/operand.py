"""``QuantizedOperand``: one input-channel segment of a deployed layer, i.e. an activation grid with its per-timestep
tables and the weight columns it multiplies, stored as integer codes (see ``kernels/reference.py`` for the formats).

A layer has one operand, or two for the split skip convs of UNet up blocks (each half of the concatenated input has
its own activation and weight quantizers). An operand runs on the kernels when its grids are ones a GEMM can apply
(per-tensor activations, one weight scale per output channel, at most 8 bits); otherwise it *simulates* (dequantizes
and runs the float op) and says so: the numbers stay the fake-quant model's, the speed does not improve.
"""
from __future__ import annotations

from typing import Any

import torch

from ..fp8 import FP8_DTYPE, fake_quantize_fp8
from ..nn.quantizer import GridState
from ..kernels import ops, reference
from ..timestep import TimestepState

class Fp32Tables(GridState):
    """The deployed tables: their fp32 buffers stay exactly fp32 (the kernels read them as such) and their FP8 codes
    e4m3 through ``model.to(dtype)`` / ``.half()`` / ``.double()``; only their device moves."""

    exact_fp32 = True


class ActTable(Fp32Tables):
    """A static activation grid per calibrated timestep: ``scale``, ``shift``, ``offset`` ``[T, Ca]`` fp32 (``Ca`` = 1
    per tensor, else one per channel). Codes are ``clamp(round(x / scale) + shift, lo, hi)`` (int8) and mean
    ``scale * (code + offset)``; ``shift = zero_point - o`` and ``offset = -shift`` for the int8 offset ``o``."""

    def __init__(self, rows: int, channels: int, code_range: tuple[int, int], state: TimestepState,
                 fp8: bool = False) -> None:
        super().__init__()
        self.lo, self.hi = code_range
        self.fp8 = fp8  # e4m3 codes ``e4m3(x / scale)`` (questdiff.fp8): shift and offset stay 0
        self.register_buffer("scale", torch.ones(rows, channels))
        self.register_buffer("shift", torch.zeros(rows, channels))
        self.register_buffer("offset", torch.zeros(rows, channels))
        self._state = state

    @property
    def per_tensor(self) -> bool:
        return self.scale.shape[1] == 1

    @property
    def fits_int8(self) -> bool:
        """Whether the codes are 8-bit (int8, or FP8): what the kernels take."""
        return self.fp8 or self.hi - self.lo <= 255

    def spec(self) -> dict[str, Any]:
        return {"rows": self.scale.shape[0], "channels": self.scale.shape[1], "code_range": [self.lo, self.hi],
                "fp8": self.fp8}

    @torch.no_grad()
    def fill(self, scale: torch.Tensor, zero_point: torch.Tensor, o: int) -> None:
        """Set the tables from a fake quantizer's ``scale`` / ``zero_point`` ``[T, Ca]`` and the int8 offset ``o``."""
        self.scale.copy_(scale.float())
        self.shift.copy_(zero_point.float() - o)
        self.offset.copy_(o - zero_point.float())

    def rows(self, device: torch.device) -> torch.Tensor:
        """The active timestep rows ``[R]`` on ``device`` (``TimestepState.row_vector``): one per equal part of the
        batch, found on the device for deployed models (no host sync; traceable and CUDA-graph safe)."""
        return self._state.row_vector(device)

    def per_sample(self, table: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """``table [T, Ca]`` at each sample's row, broadcastable against ``x`` (batch first): ``[B, .., Ca, ..]``."""
        rows = self.rows(x.device)
        values = table[rows].repeat_interleave(x.shape[0] // rows.numel(), dim=0)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[channel_dim % x.ndim] = table.shape[1]
        return values.reshape(shape)

    def tokens(self, x: torch.Tensor, channels_first: bool, sums: bool,
               use_triton: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """int8 codes of ``x`` (per-tensor grid; ``[..., C]``, or a conv input ``[B, C, ...]`` when
        ``channels_first``) in ``x``'s shape, channels last in memory, and the per-token code sums ``[M]`` int32 when
        ``sums`` (else ``None``)."""
        rows = self.rows(x.device)
        scale, shift = self.scale[:, 0], self.shift[:, 0]
        if self.fp8:  # plain ops (Inductor fuses them under torch.compile): no zero points, so no code sums
            view = x.movedim(1, -1) if channels_first else x
            codes = reference.quantize_tokens_fp8(view.reshape(-1, view.shape[-1]), scale, rows).view(view.shape)
            return (codes.movedim(-1, 1) if channels_first else codes), None
        if torch.compiler.is_compiling():  # plain ops: Inductor fuses them into the kernel producing x
            view = x.movedim(1, -1) if channels_first else x
            codes, total = reference.quantize_tokens(view.reshape(-1, view.shape[-1]), scale, shift, rows, self.lo,
                                                     self.hi)
            codes = codes.view(view.shape)
            return (codes.movedim(-1, 1) if channels_first else codes), (total if sums else None)
        codes, total = ops.quantize(x, scale, shift, rows, self.lo, self.hi, channels_first, sums, use_triton)
        return codes, (total if sums else None)

    def fake_quantize(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """``scale * (codes + offset)`` of ``x``: the fake-quant activation (simulation path)."""
        if self.fp8:
            return fake_quantize_fp8(x, self.per_sample(self.scale, x, channel_dim))
        scale, shift, offset = (self.per_sample(t, x, channel_dim) for t in (self.scale, self.shift, self.offset))
        codes = reference.quantize_codes(x, scale, shift, self.lo, self.hi)
        return ((codes.float() + offset) * scale).to(x.dtype)

    def extra_repr(self) -> str:
        grid = "per tensor" if self.per_tensor else "per channel"
        codes = "fp8 e4m3" if self.fp8 else f"codes [{self.lo}, {self.hi}]"
        return f"{codes}, {grid}, rows={self.scale.shape[0]}"


class QuantizedOperand(Fp32Tables):
    """Activation grid (``act``, an ``ActTable``) and weight codes of one input segment.

    Buffers:
        weight: int8 codes ``[N, taps, C]`` (8-bit) or packed uint8 nibbles ``[N, taps, C / 2]`` (4-bit).
        weight_scale: ``[N, G]`` fp32 (``G`` weight groups along the flattened input; 1 = per output channel).
        weight_offset: ``[N, G]`` fp32, 8-bit weights: real weight ``scale * (code + offset)``.
        weight_zero: ``[N, G]`` int16, 4-bit weights: real weight ``scale * (nibble - zero)``.
        weight_sum: ``[N]`` fp32, sum over the input of the integer weights the kernel multiplies.
    """

    def __init__(self, *, rows: int, act_channels: int, act_range: tuple[int, int], out_channels: int, taps: int,
                 channels: int, weight_bits: int, weight_groups: int, weight_offset_used: bool = True,
                 state: TimestepState, fp8: bool = False) -> None:
        super().__init__()
        self.act = ActTable(rows, act_channels, act_range, state, fp8)
        self.weight_bits = weight_bits
        self.fp8 = fp8  # e4m3 weight codes and activation codes (symmetric: no offsets, no sums)
        self.taps, self.channels = taps, channels
        self.weight_offset_used = weight_offset_used and not fp8  # 8-bit int weights with an offset need asum
        packed = weight_bits <= 4
        shape = (out_channels, taps, channels // 2 if packed else channels)
        dtype = FP8_DTYPE if fp8 else torch.uint8 if packed else torch.int8
        self.register_buffer("weight", torch.zeros(shape, dtype=dtype))
        self.register_buffer("weight_scale", torch.ones(out_channels, weight_groups))
        self.register_buffer("weight_offset", None if packed or fp8 else torch.zeros(out_channels, weight_groups))
        self.register_buffer("weight_zero",
                             torch.zeros(out_channels, weight_groups, dtype=torch.int16) if packed else None)
        self.register_buffer("weight_sum", torch.zeros(out_channels))

    # -- description -------------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON-able shape description (enough to rebuild an empty operand before loading its state)."""
        act = self.act.spec()
        return {"rows": act["rows"], "act_channels": act["channels"], "act_range": act["code_range"],
                "out_channels": self.weight.shape[0], "taps": self.taps, "channels": self.channels,
                "weight_bits": self.weight_bits, "weight_groups": self.weight_scale.shape[1], "fp8": self.fp8,
                "weight_offset_used": self.weight_offset_used}

    @property
    def runs_kernels(self) -> bool:
        """Whether a GEMM can apply these grids (else the operand simulates)."""
        return (self.act.per_tensor and self.act.fits_int8 and self.weight_scale.shape[1] == 1
                and self.weight_bits <= 8 and not (self.weight_bits <= 4 and self.channels % 2))

    def extra_repr(self) -> str:
        return f"W{self.weight_bits}, taps={self.taps}, {'kernels' if self.runs_kernels else 'simulated'}"

    # -- values ------------------------------------------------------------------------------------------------
    def integer_weight(self) -> torch.Tensor:
        """The integers the kernel multiplies, ``[N, taps, C]`` int8 (per-output-channel grids)."""
        zero = None if self.weight_zero is None else self.weight_zero[:, 0]
        return reference.weight_integers(self.weight, zero)

    def dequantized_weight(self) -> torch.Tensor:
        """Real weight values ``[N, taps, C]`` fp32 (what the fake-quant layer multiplies)."""
        n = self.weight.shape[0]
        if self.fp8:
            return self.weight.float() * self.weight_scale[:, :1, None]
        if self.weight_zero is not None:
            values = torch.cat([self.weight & 0xF, self.weight >> 4], dim=-1).float()
            offset = -self.weight_zero.float()
        else:
            values, offset = self.weight.float(), self.weight_offset
        groups = self.weight_scale.shape[1]
        grouped = values.reshape(n, groups, -1)
        return ((grouped + offset[:, :, None]) * self.weight_scale[:, :, None]).reshape(n, self.taps, self.channels)

    # -- kernels -----------------------------------------------------------------------------------------------
    def _weight_args(self, rows: slice = slice(None), taps: slice = slice(None)) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Kernel weight arguments of output channels ``rows`` and kernel taps ``taps`` (all by default)."""
        offset = self.weight_offset[rows, 0] if self.weight_offset is not None and self.weight_offset_used else None
        zero = None if self.weight_zero is None else self.weight_zero[rows, 0]
        weight = self.weight[rows, taps]
        if taps == slice(None):
            weight_sum = self.weight_sum[rows]
        else:  # the sum over these taps only (rare: Conv3d depth taps)
            weight_sum = reference.weight_integers(weight, zero).flatten(1).sum(dim=1).float()
        return weight, self.weight_scale[rows, 0], offset, weight_sum, zero

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
               use_triton: bool) -> torch.Tensor:
        """``x [..., C]`` -> ``[..., N]`` on the GEMM kernel."""
        codes, sums = self.act.tokens(x, False, self.weight_offset_used, use_triton)
        w, sw, ow, wsum, wz = self._weight_args()
        res = None if residual is None else residual.reshape(-1, residual.shape[-1])
        y = ops.gemm(codes.reshape(-1, x.shape[-1]), w, self.act.scale[:, 0], self.act.offset[:, 0],
                     self.act.rows(x.device), sw, ow, wsum, wz, sums, bias, res, x.dtype, use_triton)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def conv2d(self, codes: torch.Tensor, sums: torch.Tensor | None, bias: torch.Tensor | None,
               residual: torch.Tensor | None, kernel_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int], out_dtype: torch.dtype, channels_last: bool,
               use_triton: bool, rows: slice = slice(None), taps: slice = slice(None)) -> torch.Tensor:
        """Activation codes ``[B, C, H, W]`` (``act.tokens``: channels last) -> ``[B, N, Ho, Wo]`` on the
        implicit-GEMM kernel, in channels-last memory or, with ``channels_last=False``, contiguous NCHW (the model's
        layout: the next op copies nothing), with output channels ``rows`` and kernel taps ``taps`` of the weight (all
        by default: deployed layers take a part of it for grouped convs and Conv3d depth taps). ``sums``: the codes'
        per-pixel sums over ``C`` ``[B * H * W]`` from the quantize step, which 8-bit weights with an offset need
        (``None``: summed here)."""
        w, sw, ow, wsum, wz = self._weight_args(rows, taps)
        if ow is not None and sums is None:
            sums = codes.sum(dim=1, dtype=torch.int32).reshape(-1)
        return ops.conv2d(codes, w, self.act.scale[:, 0], self.act.offset[:, 0], self.act.rows(codes.device), sw, ow,
                          wsum, wz, sums, bias, residual, list(kernel_size), list(stride), list(padding),
                          list(dilation), out_dtype, channels_last, use_triton)
