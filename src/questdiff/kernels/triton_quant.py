"""Triton activation quantization: one pass that reads the activation, writes its int8 codes channels-last and, on
request, each token's code sum (the GEMMs' zero-point term for 8-bit weights with an offset), in eager mode.

Under ``torch.compile`` the deployed modules use ``reference.quantize_tokens`` instead, which Inductor fuses into
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
def _quantize_kernel(x_ptr, out_ptr, sum_ptr, scale_ptr, shift_ptr, rows_ptr, P, C, sxn, sxp, sxc, IMAGES_PER_ROW,
                     lo, hi, SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program: one BLOCK_P x BLOCK_C tile of image n (no loop: every tile in flight at once, as a memory-bound
    # pass needs); x is read with its strides, codes written [N, P, C], the tile's code sums added to the token's sum
    c_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    n = tl.program_id(1)
    row = tl.load(rows_ptr + n // IMAGES_PER_ROW)
    scale = tl.load(scale_ptr + row)
    shift = tl.load(shift_ptr + row)
    rp = (pid // c_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    rc = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = rp < P
    mask = p_ok[:, None] & (rc < C)[None, :]
    n64 = n.to(tl.int64)
    x = tl.load(x_ptr + n64 * sxn + rp.to(tl.int64)[:, None] * sxp + rc[None, :] * sxc, mask=mask, other=0.0)
    codes = round_half_even(tl.math.div_rn(x.to(tl.float32), scale)) + shift  # IEEE division, ties to even: the
    codes = tl.minimum(tl.maximum(codes, lo), hi)                              # fake-quant integers
    tl.store(out_ptr + (n64 * P + rp)[:, None] * C + rc[None, :], codes.to(tl.int8), mask=mask)
    if SUMS:
        tl.atomic_add(sum_ptr + n64 * P + rp, tl.sum(tl.where(mask, codes, 0.0).to(tl.int32), axis=1), mask=p_ok)


def quantize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, rows: torch.Tensor, lo: int, hi: int,
             channels_first: bool, sums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``reference.quantize_tokens`` on ``x`` as tokens: ``[..., C]`` (``channels_first=False``) or a
    conv input ``[B, C, *spatial]`` (NCHW or channels-last memory). Returns the codes in ``x``'s shape, channels
    last in memory, and the per-token sums ``[M]`` int32 (an empty tensor unless ``sums``)."""
    if channels_first:
        batch, c = x.shape[:2]
        spatial = x.shape[2:]
        view = x.flatten(2)  # [B, C, P]: a view for NCHW and channels-last memory alike
        images, tokens = batch, view.shape[2]
        strides = (view.stride(0), view.stride(2), view.stride(1))
    else:
        c = x.shape[-1]
        view = x.reshape(-1, c)
        images, tokens = rows.numel(), view.shape[0] // rows.numel()
        strides = (tokens * view.stride(0), view.stride(0), view.stride(1))
    if (images if channels_first else view.shape[0]) % rows.numel():
        raise ValueError(f"an input of batch {x.shape[0]} cannot take per-sample rows for {rows.numel()} timesteps")
    out = torch.empty((images, tokens, c), device=x.device, dtype=torch.int8)
    total = (torch.zeros if sums else torch.empty)((images * tokens,) if sums else (0,), device=x.device,
                                                   dtype=torch.int32)
    block_p, block_c = 64, 64
    grid = (triton.cdiv(tokens, block_p) * triton.cdiv(c, block_c), images)
    _quantize_kernel[grid](view, out, total, scale, shift, rows, tokens, c, *strides, images // rows.numel(),
                           float(lo), float(hi), SUMS=sums, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    if channels_first:
        codes = out.view(batch, *spatial, c).movedim(-1, 1)
    else:
        codes = out.view(x.shape)
    return codes, total
