"""Quantizer modules. They only apply parameters; calibration code (``questdiff.calibration``) produces them.

- ``WeightQuantizer``: per output channel / per tensor / per group scale and zero point (buffers).
- ``ActQuantizer``: time-step-aware activation quantizer with ONE registered scale parameter of shape
  ``[T, *scale_shape]`` (T = calibrated timesteps); forward indexes the active row of the shared
  ``TimestepState`` (or one row per sample when a batch mixes timesteps), so gradients reach only the rows in use
  and state_dict / .to() / optimizers need no special cases.

Both keep their scales and zero points in fp32 (or wider) when the model is cast to bf16 / fp16 (``GridState``): they
define the integer grids, which a bf16 copy of a scale would move away from the deployed kernels' fp32 tables.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import ActivationSpec, WeightSpec
from ..fp8 import FP8_DTYPE, fake_quantize_fp8
from ..primitives import fake_quantize, qrange, to_groups
from ..timestep import TimestepError, TimestepState


class GridState(nn.Module):
    """A module whose floating-point parameters and buffers (and their gradients) never become narrower than fp32:
    ``model.to(torch.bfloat16)`` / ``.half()`` moves them to the new device only (``.double()`` does widen them,
    unless ``exact_fp32``: the deployed tables, which the kernels read as fp32). FP8 codes keep their e4m3 dtype."""

    exact_fp32 = False

    def _apply(self, fn: Any, recurse: bool = True) -> "GridState":  # type: ignore[override]
        tensors = {**self._parameters, **self._buffers}
        # ``.data``: the storage itself (``_apply`` may re-point a Parameter's data in place)
        kept = {name: (t.data, None if t.grad is None else t.grad.data) for name, t in tensors.items()
                if t is not None and t.dtype in (torch.float32, FP8_DTYPE)}
        super()._apply(fn, recurse)
        for name, (old, grad) in kept.items():
            new = self._parameters[name] if name in self._parameters else self._buffers[name]
            if new is None or new.dtype == old.dtype:
                continue
            narrower = new.is_floating_point() and torch.finfo(new.dtype).bits < 32
            if old.dtype == FP8_DTYPE or narrower or self.exact_fp32:
                new.data = old.to(new.device)
                if grad is not None:
                    new.grad = grad.to(new.device)
        return self


def weight_scale_shape(weight_shape: torch.Size | tuple[int, ...], spec: WeightSpec) -> tuple[int, ...]:
    """Shape of the scale/zero-point buffers of a weight of ``weight_shape``."""
    ndim = len(weight_shape)
    if spec.granularity == "tensor":
        return (1,) * ndim
    if spec.granularity == "channel":
        return (weight_shape[0],) + (1,) * (ndim - 1)
    k = 1
    for d in weight_shape[1:]:
        k *= d
    assert spec.group_size is not None
    return (weight_shape[0], k // spec.group_size, 1)


class WeightQuantizer(GridState):
    """Fake-quantizes a weight ``[C_out, ...]`` with round-to-nearest (straight-through gradient to the weight).

    Buffers ``scale`` / ``zero_point`` are shaped by ``weight_scale_shape``; they stay fixed during finetuning
    (the paper keeps weight quantization parameters frozen).
    """

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], spec: WeightSpec) -> None:
        super().__init__()
        self.spec = spec
        self.weight_shape = tuple(weight_shape)
        if spec.granularity == "group":
            to_groups(torch.empty(self.weight_shape, device="meta"), spec.group_size or 0)  # validates divisibility
        self.qmin, self.qmax = qrange(spec.bits, spec.symmetric)
        shape = weight_scale_shape(self.weight_shape, spec)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.enabled = True

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def fp8(self) -> bool:
        """Whether the grid is e4m3 (``questdiff.fp8``; ``zero_point`` stays 0) rather than integers."""
        return self.spec.format == "fp8"

    def view(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight in the layout the scale broadcasts against (groups view for per-group)."""
        if self.spec.granularity == "group":
            assert self.spec.group_size is not None
            return to_groups(weight, self.spec.group_size)
        return weight

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))

    def quantize_view(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantize a weight given in ``view`` layout (overridden by AdaRound)."""
        if self.fp8:
            return fake_quantize_fp8(w, self.scale)
        return fake_quantize(w, self.scale, self.zero_point, self.qmin, self.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        # computed against the fp32 scales (a half weight promotes), returned in the weight's own dtype: a
        # half/bf16 model runs its layers in that dtype
        return self.quantize_view(self.view(weight)).reshape(weight.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, granularity={self.spec.granularity}"


class ActQuantizer(GridState):
    """Time-step-aware activation fake-quantizer.

    Args:
        num_rows: number of calibrated timesteps T (1 = one shared scale set).
        spec: bits, symmetric, per-channel.
        channels: size of the channel dimension when per-channel (ignored otherwise).
        channel_dim: dimension of ``x`` holding the channels: 1 for ``[N, C, ...]`` conv inputs, -1 for
            ``[..., C]`` token inputs (the official code's "last dim" choice for 3-D tensors).
        state: the denoiser's shared ``TimestepState``.
        always_zero: zero point fixed at 0 on an asymmetric range (softmax outputs).

    Parameters: ``scale [T, C]`` or ``[T, 1]`` (trainable, LSQ-style STE); buffer ``zero_point`` (same shape, fixed).
    """

    def __init__(
        self,
        num_rows: int,
        spec: ActivationSpec,
        state: TimestepState,
        channels: int | None = None,
        channel_dim: int = 1,
        always_zero: bool = False,
    ) -> None:
        super().__init__()
        per_channel = spec.per_channel and channels is not None
        self.bits = spec.bits
        self.fp8 = spec.format == "fp8"  # the e4m3 grid (``questdiff.fp8``): symmetric, zero_point stays 0
        self.symmetric = (spec.symmetric or self.fp8) and not always_zero
        self.always_zero = always_zero
        self.per_channel = per_channel
        self.channel_dim = channel_dim
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        width = channels if per_channel else 1
        self.scale = nn.Parameter(torch.ones(num_rows, width))
        self.register_buffer("zero_point", torch.zeros(num_rows, width))
        self._state = state
        self.enabled = True

    @property
    def num_rows(self) -> int:
        return self.scale.shape[0]

    @property
    def state(self) -> TimestepState:
        return self._state

    def row_index(self) -> int:
        return 0 if self.num_rows == 1 else self._state.require_index()

    def broadcast_shape(self, x: torch.Tensor) -> list[int]:
        """Shape that makes one row of ``scale`` broadcast against ``x``."""
        shape = [1] * x.ndim
        if self.per_channel:
            shape[self.channel_dim % x.ndim] = -1
        return shape

    def reduce_axis(self, x: torch.Tensor) -> int | None:
        """The kept axis for statistics over ``x`` (``None`` = per tensor)."""
        return self.channel_dim % x.ndim if self.per_channel else None

    @torch.no_grad()
    def set_row(self, index: int, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale[index].copy_(scale.reshape(-1).to(self.scale.dtype))
        self.zero_point[index].copy_(zero_point.reshape(-1).to(self.zero_point.dtype))

    def row_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the active row(s), broadcastable against ``x`` (fp32: ``fake_quantize`` computes
        the integers in fp32 whatever ``x``'s dtype).

        A batch mixing timesteps (``state.rows`` set, ``[B]``) gets one row per sample: ``[B', ...]`` with the
        batch's leading dim ``B' = k * B`` (attention folds heads into the batch sample-major, so each row repeats
        ``k`` times). So do rows found on the device (``state.device_rows``, ``[R]``: a deployed model's fake-quant
        leftovers). They come in fp32: the fake quantizers compute the integers in fp32 whatever ``x``'s dtype."""
        rows = None
        if self.num_rows > 1:  # per-sample rows: a mixed batch, or rows found on the device (deployed models)
            rows = self._state.rows if self._state.rows is not None else self._state.device_rows
        shape = self.broadcast_shape(x)
        if rows is None:
            i = self.row_index()
            return self.scale[i].reshape(shape), self.zero_point[i].reshape(shape)
        repeat, rest = divmod(x.shape[0], len(rows))
        if rest or not repeat:
            raise TimestepError(f"an input of batch {x.shape[0]} cannot take per-sample rows for {len(rows)} timesteps: "
                                "its leading dim must be a multiple of the timestep argument's length")
        rows = rows.to(self.scale.device)
        if repeat > 1:
            rows = rows.repeat_interleave(repeat)
        shape[0] = x.shape[0]
        return self.scale[rows].reshape(shape), self.zero_point[rows].reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(x)(x)

    def frozen(self, like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """This quantizer as a pure function for inputs shaped like ``like`` (only its shape and dtype are read), with
        the enabled flag and the active scale rows resolved now: safe to re-run later, e.g. when activation
        checkpointing recomputes it in backward after the timestep state and enabled flags have moved on. Gradients
        still reach ``scale`` through the returned function. Forward hooks of the module do not fire for it."""
        if not self.enabled:
            return _identity
        scale, zero_point = self.row_params(like)
        if self.fp8:  # computes in fp32 and returns like's dtype itself
            return lambda x: fake_quantize_fp8(x, scale)
        qmin, qmax = self.qmin, self.qmax
        return lambda x: fake_quantize(x, scale, zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        kind = "channel" if self.per_channel else "tensor"
        grid = "fp8 e4m3" if self.fp8 else f"bits={self.bits}, symmetric={self.symmetric}"
        return f"{grid}, rows={self.num_rows}, per={kind}"


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
