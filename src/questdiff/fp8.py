"""The FP8 (e4m3) quantization grid: pure functions, as ``primitives.py`` is for the integer grids.

A value ``x`` with scale ``s`` becomes the e4m3 code ``c = e4m3(clamp(x / s, -448, 448))`` (nearest, ties to even:
torch's cast) and means ``c * s``. The grid is symmetric (no zero point) and floating (its steps grow with the
magnitude), so one static scale covers a wider range than an int8 grid at the same relative error. Codes are
computed in fp32 whatever the input's dtype, exactly as the deployed kernels take them, and ``torch._scaled_mm`` /
the Triton GEMMs multiply them with fp32 accumulation (``kernels/reference.py``).

Scale searches mirror the integer ones: Lp shrink over candidate ranges for weights (spec §2.4), percentile-by-MSE
for activations (spec §2.6), or min-max.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .primitives import LP_CANDIDATES, LP_NORM, LP_SHRINK_STEP, MIN_SCALE, PERCENTILES, Axis, _error, _quantile, amin_amax

FP8_MAX = 448.0  # the largest finite float8_e4m3fn value
FP8_DTYPE = torch.float8_e4m3fn


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 codes of ``x`` on scale ``scale`` (broadcast), computed in fp32, saturating at +-448."""
    return (x.float() / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the e4m3 grid of ``scale``, in ``x``'s dtype, with straight-through rounding:
    gradients reach ``x`` (zero where it saturates) and ``scale`` (LSQ-style), as ``primitives.fake_quantize``."""
    y = torch.clamp(x.float() / scale.float(), -FP8_MAX, FP8_MAX)
    q = y + (y.to(FP8_DTYPE).float() - y).detach()
    return (q * scale.float()).to(x.dtype)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps ``[-amax, amax]`` onto the e4m3 range."""
    return (amax / FP8_MAX).clamp_min(MIN_SCALE)


def search_fp8_minmax(x: torch.Tensor, axis: Axis = None) -> torch.Tensor:
    """Min-max FP8 scale (of ``max |x|``), kept dims broadcast against ``x``."""
    lo, hi = amin_amax(x, axis)
    return fp8_scale(torch.maximum(lo.abs(), hi.abs()))


def search_fp8_lp_shrink(x: torch.Tensor, axis: Axis = 0, p: float = LP_NORM, num_candidates: int = LP_CANDIDATES,
                         shrink_step: float = LP_SHRINK_STEP) -> torch.Tensor:
    """The weight search of ``primitives.search_lp_shrink`` on the FP8 grid: ``max |x|`` shrunk by ``1 - 0.01 i``
    for ``i < 80``, the candidate with the lowest mean ``|x - Q(x)|^p`` kept per ``axis``."""
    lo, hi = amin_amax(x, axis)
    amax = torch.maximum(lo.abs(), hi.abs())
    best_err = torch.full_like(amax, math.inf)
    best = torch.ones_like(amax)
    for i in range(num_candidates):
        scale = fp8_scale(amax * (1.0 - shrink_step * i))
        err = _error(x, fake_quantize_fp8(x, scale), p, axis)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best


def search_fp8_percentile(x: torch.Tensor, axis: Axis = None,
                          percentiles: Sequence[float] = PERCENTILES) -> torch.Tensor:
    """The activation search of ``primitives.search_percentile`` on the FP8 grid: clip ``|x|`` at each percentile
    and keep the scale with the lowest MSE."""
    best = None
    for pct in percentiles:
        scale = fp8_scale(_quantile(x.abs(), pct, axis))
        err = _error(x, fake_quantize_fp8(x, scale), 2.0, axis)
        best = (err, scale) if best is None else (torch.where(err < best[0], err, best[0]),
                                                  torch.where(err < best[0], scale, best[1]))
    assert best is not None
    return best[1]
