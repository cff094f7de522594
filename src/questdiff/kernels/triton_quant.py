"""Triton activation quantization: one pass that reads the activation and writes its int8 codes (eager mode).

Under ``torch.compile`` the deployed modules use ``reference.quantize_codes`` instead, which Inductor fuses into
the kernel producing the activation (GroupNorm + SiLU, LayerNorm, GELU): the activation is then never written in
16 bits at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """``torch.round`` (nearest, ties to even) from ``floor``, exact in fp32 (also in the Triton interpreter)."""
    r = tl.math.floor(x + 0.5)
    odd = (r - 2.0 * tl.math.floor(r * 0.5)) != 0.0
    return tl.where((r - x == 0.5) & odd, r - 1.0, r)


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, row_ptr, numel, lo, hi, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = tl.load(row_ptr)
    scale = tl.load(scale_ptr + row)
    shift = tl.load(shift_ptr + row)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    codes = round_half_even(tl.math.div_rn(x, scale)) + shift  # IEEE division, ties to even: the fake-quant integers
    codes = tl.minimum(tl.maximum(codes, lo), hi)
    tl.store(out_ptr + offs, codes.to(tl.int8), mask=mask)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, row: torch.Tensor, lo: int,
                   hi: int) -> torch.Tensor:
    """Triton twin of ``reference.quantize_codes(x, scale[row], shift[row], lo, hi)``; keeps ``x``'s layout."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    out = torch.empty_like(x, dtype=torch.int8)  # same strides as x: a flat pass maps element to element
    numel = x.numel()
    block = 4096
    _quantize_kernel[(triton.cdiv(numel, block),)](x, out, scale, shift, row, numel, float(lo), float(hi),
                                                    BLOCK=block, num_warps=8)
    return out
