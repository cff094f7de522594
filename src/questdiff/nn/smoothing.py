"""Static per-input-channel smoothing of a layer's activation (SmoothQuant), folded into its weight.

A linear or convolution layer is linear in its input channels, so ``x -> x / s`` on every pixel/token together with
``W -> W diag(s)`` on the weight's input-channel axis leaves its float output unchanged. With
``s_c = max|x_c|^alpha / max|W_c|^(1 - alpha)`` (the activation's range over the calibration set, the weight's over
its output channels and taps) the outlier channels of the activation move into the weight: the smoothed activation
quantizes well per tensor, a grid the GEMM kernels apply, where 4-bit activations would otherwise need per-channel
scales (simulated: no GEMM applies a scale that varies along K). ``s`` is one vector for all timesteps (the weight
is static); the per-timestep activation scales stay QuEST's. Scaling commutes with zero padding, so convolutions of
any geometry keep their output exactly.
"""
from __future__ import annotations

from typing import Any

import torch

from .quantizer import GridState

SCALE_LIMIT = 1e4  # s is clamped to [1 / limit, limit]: a dead channel (range 0) must not blow up its weight column


class ChannelSmoothing(GridState):
    """``x -> x / scale`` along the channel dim ``dim`` of ``x`` (``-1`` for tokens ``[..., C]``, ``1`` for conv
    inputs ``[N, C, ...]``). Buffer ``scale [C]`` fp32 (persistent: it comes from calibration data), ones until
    ``calibration.smoothing`` sets it; the division runs in ``x``'s dtype, identically in the fake-quant and the
    deployed layer."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.channels, self.dim = channels, dim
        self.register_buffer("scale", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.dim % x.ndim] = -1
        return x / self.scale.to(x.dtype).view(shape)

    def spec(self) -> dict[str, Any]:
        """JSON-able description (enough to rebuild it before loading its ``scale``)."""
        return {"channels": self.channels, "dim": self.dim}

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = act_max^alpha / weight_max^(1 - alpha)`` ``[C]`` from the per-channel absolute maxima of
    the activation and of the weight; channels where either is 0 keep ``s = 1``."""
    act_max, weight_max = act_max.double(), weight_max.double()
    alive = (act_max > 0) & (weight_max > 0)
    s = act_max.clamp_min(1e-30) ** alpha / weight_max.clamp_min(1e-30) ** (1 - alpha)
    s = torch.where(alive, s, torch.ones_like(s))
    return s.clamp(1 / SCALE_LIMIT, SCALE_LIMIT).float()


def per_weight_column(s: torch.Tensor, out_channels: int, groups: int) -> torch.Tensor:
    """``s [C_in]`` laid out against a weight ``[C_out, C_in / groups]`` (output channels first): output channel ``o``
    of group ``g`` multiplies input channel ``g * C_in / groups + j`` at column ``j``."""
    per_group = s.view(groups, -1)
    return per_group.repeat_interleave(out_channels // groups, dim=0)
