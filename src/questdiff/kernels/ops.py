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


@torch.library.custom_op("questdiff::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, rows: torch.Tensor, lo: int, hi: int,
             channels_first: bool, sums: bool, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``x`` on each token's row of the ``[T]`` tables, channels last in memory, and the per-token code
    sums ``[M]`` int32 (empty unless ``sums``): ``reference.quantize_tokens`` on ``x`` read as tokens (``[..., C]``,
    or a conv input ``[B, C, *spatial]`` when ``channels_first``)."""
    if use_triton:
        from .triton_quant import quantize as kernel

        return kernel(x, scale, shift, rows, lo, hi, channels_first, sums)
    tokens = x.movedim(1, -1) if channels_first else x
    codes, total = reference.quantize_tokens(tokens.reshape(-1, x.shape[1 if channels_first else -1]), scale, shift,
                                             rows, lo, hi)
    codes = codes.view(tokens.shape)
    return (codes.movedim(-1, 1) if channels_first else codes), (total if sums else total[:0])


@quantize.register_fake
def _(x, scale, shift, rows, lo, hi, channels_first, sums, use_triton):
    if channels_first:
        codes = x.new_empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype=torch.int8).movedim(-1, 1)
    else:
        codes = x.new_empty(x.shape, dtype=torch.int8)
    return codes, x.new_empty((x.numel() // x.shape[1 if channels_first else -1] if sums else 0,), dtype=torch.int32)


@torch.library.custom_op("questdiff::gemm", mutates_args=())
def gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, rows: torch.Tensor,
         w_scale: torch.Tensor, w_offset: Optional[torch.Tensor], w_sum: torch.Tensor, w_zero: Optional[torch.Tensor],
         a_sum: Optional[torch.Tensor], bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
         out_dtype: torch.dtype, use_triton: bool) -> torch.Tensor:
    """``reference.gemm``: codes ``a [M, K]`` times weight codes -> ``[M, N]`` dequantized (``a_sum [M]``: the code
    sums of ``a``'s rows, read by the Triton kernel when the weights have an offset)."""
    if use_triton:
        from . import cublas

        if cublas.scaled_mm_applies(a, w, out_dtype):  # FP8 codes: cuBLAS is the fastest 8-bit GEMM there
            return cublas.linear_fp8(a, w, a_scale, rows, w_scale, bias, residual, out_dtype)
        from .triton_gemm import gemm as kernel

        return kernel(a, w, a_scale, a_offset, rows, w_scale, w_offset, w_sum, w_zero, a_sum, bias, residual,
                      out_dtype)
    return reference.gemm(a, w, a_scale, a_offset, rows, w_scale, w_offset, w_sum, w_zero, bias, residual, out_dtype)


@gemm.register_fake
def _(a, w, a_scale, a_offset, rows, w_scale, w_offset, w_sum, w_zero, a_sum, bias, residual, out_dtype, use_triton):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("questdiff::conv2d", mutates_args=())
def conv2d(x: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, rows: torch.Tensor,
           w_scale: torch.Tensor, w_offset: Optional[torch.Tensor], w_sum: torch.Tensor,
           w_zero: Optional[torch.Tensor], a_sum: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           residual: Optional[torch.Tensor], kernel_size: list[int], stride: list[int], padding: list[int],
           dilation: list[int], out_dtype: torch.dtype, channels_last: bool, use_triton: bool) -> torch.Tensor:
    """``reference.conv2d``: codes ``x [B, C, H, W]`` -> ``[B, N, Ho, Wo]``, channels-last memory or contiguous NCHW
    (``channels_last``); ``a_sum [B * H * W]``: per-pixel code sums, read by the Triton kernel when the weights have
    an offset."""
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), out_dtype)
    if use_triton:
        from .triton_gemm import conv2d as kernel

        return kernel(x, w, a_scale, a_offset, rows, w_scale, w_offset, w_sum, w_zero, a_sum, bias, residual,
                      *geometry, channels_last)
    out = reference.conv2d(x, w, a_scale, a_offset, rows, w_scale, w_offset, w_sum, w_zero, bias, residual, *geometry)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@conv2d.register_fake
def _(x, w, a_scale, a_offset, rows, w_scale, w_offset, w_sum, w_zero, a_sum, bias, residual, kernel_size, stride,
      padding, dilation, out_dtype, channels_last, use_triton):
    batch, _, h, wd = x.shape
    ho, wo = (conv_output_size(s, *g) for s, g in zip((h, wd), zip(kernel_size, stride, padding, dilation)))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.new_empty((batch, w.shape[0], ho, wo), dtype=out_dtype).contiguous(memory_format=layout)


@torch.library.custom_op("questdiff::attention_qk", mutates_args=())
def attention_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                 rows: torch.Tensor, sm_scale: float, out_dtype: torch.dtype, use_triton: bool) -> torch.Tensor:
    """``reference.attention_qk`` (no mask): codes ``q [B, Lq, H, D]``, ``k [B, Lk, H, D]``, values ``v`` ->
    ``[B, Lq, H, D]``."""
    if use_triton:
        from .triton_attention import attention_qk as kernel

        return kernel(q, k, v, q_scale, k_scale, rows, sm_scale, out_dtype)
    return reference.attention_qk(q, k, v, q_scale, k_scale, rows, sm_scale, out_dtype).contiguous()


@attention_qk.register_fake
def _(q, k, v, q_scale, k_scale, rows, sm_scale, out_dtype, use_triton):
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.custom_op("questdiff::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              rows: torch.Tensor, sm_scale: float, p_max: int, out_dtype: torch.dtype,
              use_triton: bool) -> torch.Tensor:
    """``reference.attention`` ("qkvp" format, no mask): codes ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` ->
    ``[B, Lq, H, D]``."""
    if use_triton:
        from .triton_attention import attention as kernel

        return kernel(q, k, v, scales, offsets, rows, sm_scale, p_max, out_dtype)
    return reference.attention(q, k, v, scales, offsets, rows, sm_scale, p_max, out_dtype).contiguous()


@attention.register_fake
def _(q, k, v, scales, offsets, rows, sm_scale, p_max, out_dtype, use_triton):
    return q.new_empty(q.shape, dtype=out_dtype)
