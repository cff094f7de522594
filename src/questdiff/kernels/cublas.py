"""cuBLAS FP8 GEMM (``torch._scaled_mm``) for deployed linear layers on FP8 codes: the fastest 8-bit GEMM measured at
transformer shapes on the H200 (DESIGN §5). Row-wise scales: each token's activation scale (its timestep row's, so
batches mixing timesteps stay exact) and each output channel's weight scale, applied by cuBLAS to the fp32
accumulator; bf16 output (what cuBLAS supports for row-wise scaling).
"""
from __future__ import annotations

import torch

from . import reference


def scaled_mm_applies(a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether ``linear_fp8`` takes this call: FP8 codes, bf16 output, K and N multiples of 16 (cuBLASLt's FP8
    alignment)."""
    return (reference.is_fp8(a) and out_dtype == torch.bfloat16 and a.shape[1] % 16 == 0 and w.shape[0] % 16 == 0
            and hasattr(torch, "_scaled_mm"))


def linear_fp8(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, rows: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``reference.gemm`` on FP8 codes ``a [M, K]`` and weights ``w [N, 1, K]`` (e4m3) through ``torch._scaled_mm``:
    ``(a w^T) * sa[m] * sw[n] + bias + residual``, ``[M, N]`` of ``out_dtype``."""
    sa = reference.sample_values(a_scale, rows, a.shape[0]).float()[:, None].contiguous()
    sw = w_scale.float()[None, :].contiguous()
    y = torch._scaled_mm(a.contiguous(), w.reshape(w.shape[0], -1).t(), sa, sw,
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    return y if residual is None else y + residual.to(out_dtype)
