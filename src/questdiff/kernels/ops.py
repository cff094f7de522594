"""The low-bit kernels as torch custom ops (``torch.ops.questdiff.*``), so ``torch.compile`` and CUDA graphs treat
each one as a single opaque node with known output shapes.

Each op runs its Triton kernel when ``use_triton`` is set (see ``triton_runs_on``) and its ``reference.py`` twin
otherwise: the CPU backend and the ``backend="reference"``
choice of ``questdiff.convert``.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import reference


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device, backend: str = "auto") -> bool:
    """Whether ``backend`` runs the Triton kernels on ``device``: on CUDA unless it is ``"reference"``; on the CPU
    only for an explicit ``"triton"`` under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests)."""
    if backend == "reference" or not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("questdiff::quantize_codes", mutates_args=())
def quantize_codes(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, row: torch.Tensor, lo: int, hi: int,
                   use_triton: bool) -> torch.Tensor:
    """int8 codes of ``x`` on the grid of table row ``row`` (``reference.quantize_codes``); keeps the layout."""
    if use_triton:
        from .triton_quant import quantize_codes as kernel

        return kernel(x, scale, shift, row, lo, hi)
    return reference.quantize_codes(x, scale[row], shift[row], lo, hi)


@quantize_codes.register_fake
def _(x, scale, shift, row, lo, hi, use_triton):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("questdiff::gemm", mutates_args=())
def gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, row: torch.Tensor,
         w_scale: torch.Tensor, w_offset: Optional[torch.Tensor], w_sum: torch.Tensor, w_zero: Optional[torch.Tensor],
         bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], out_dtype: torch.dtype,
         use_triton: bool) -> torch.Tensor:
    """``reference.gemm``: codes ``a [M, K]`` times weight codes -> ``[M, N]`` dequantized."""
    if use_triton:
        from .triton_gemm import gemm as kernel

        return kernel(a, w, a_scale, a_offset, row, w_scale, w_offset, w_sum, w_zero, bias, residual, out_dtype)
    return reference.gemm(a, w, a_scale, a_offset, row, w_scale, w_offset, w_sum, w_zero, bias, residual, out_dtype)


@gemm.register_fake
def _(a, w, a_scale, a_offset, row, w_scale, w_offset, w_sum, w_zero, bias, residual, out_dtype, use_triton):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("questdiff::conv2d", mutates_args=())
def conv2d(x: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, row: torch.Tensor,
           w_scale: torch.Tensor, w_offset: Optional[torch.Tensor], w_sum: torch.Tensor,
           w_zero: Optional[torch.Tensor], bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
           kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int], out_dtype: torch.dtype,
           use_triton: bool) -> torch.Tensor:
    """``reference.conv2d``: codes ``x [B, C, H, W]`` -> ``[B, N, Ho, Wo]`` (channels-last memory)."""
    args = (x, w, a_scale, a_offset, row, w_scale, w_offset, w_sum, w_zero, bias, residual, tuple(kernel_size),
            tuple(stride), tuple(padding), out_dtype)
    # the Triton kernel has no dilation yet: dilated convs run the reference (exact, slower) until it does
    if use_triton and all(d == 1 for d in dilation):
        from .triton_gemm import conv2d as kernel

        return kernel(*args)
    return reference.conv2d(*args, tuple(dilation)).contiguous(memory_format=torch.channels_last)


@conv2d.register_fake
def _(x, w, a_scale, a_offset, row, w_scale, w_offset, w_sum, w_zero, bias, residual, kernel_size, stride, padding,
      dilation, out_dtype, use_triton):
    batch, _, h, wd = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return x.new_empty((batch, ho, wo, w.shape[0]), dtype=out_dtype).permute(0, 3, 1, 2)


@torch.library.custom_op("questdiff::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              row: torch.Tensor, sm_scale: float, p_max: int, out_dtype: torch.dtype,
              use_triton: bool) -> torch.Tensor:
    """``reference.attention`` (no mask): codes ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` -> ``[B, Lq, H, D]``."""
    if use_triton:
        from .triton_attention import attention as kernel

        return kernel(q, k, v, scales, offsets, row, sm_scale, p_max, out_dtype)
    return reference.attention(q, k, v, scales, offsets, row, sm_scale, p_max, out_dtype).contiguous()


@attention.register_fake
def _(q, k, v, scales, offsets, row, sm_scale, p_max, out_dtype, use_triton):
    return q.new_empty(q.shape, dtype=out_dtype)
