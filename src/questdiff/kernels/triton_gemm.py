"""Triton GEMM on int8 codes for linear layers and channels-last implicit-GEMM convolutions (one kernel).

The math and the storage formats are those of ``kernels/reference.py`` (its module docstring). What this kernel
adds to it:

- **Implicit GEMM.** A conv is a GEMM with ``M = batch * Ho * Wo`` output pixels, ``N = C_out`` and
  ``K = kh * kw * C_in``; the A tile of each (tap, channel block) step is gathered from the input with its strides
  (channels-last input gives contiguous, vectorised channel loads), out-of-image taps read the code of a real zero.
  A linear layer is the one-tap case without the spatial arithmetic.
- **Fused epilogue.** Zero-point corrections, per-channel dequantization, bias and an optional residual are applied
  to the int32 accumulator in registers; the output is written once, in the model's dtype.
- **4-bit weights** are unpacked in registers: each packed step holds channels ``[c, c + BK/2)`` and the same block
  of the upper channel half, so one step runs two ``BK/2``-deep int8 dots without shuffles.

Tiles are autotuned per shape (``M, N, C``, taps); the activation row index and the scale tables are read on the
device, so the launch needs no host sync and is CUDA-graph safe.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def quick_bench(fn, quantiles):  # noqa: ANN001 - the autotuner's do_bench hook
    """Autotuning timer: a few ms per config instead of Triton's default 125 (a UNet has ~50 GEMM shapes)."""
    return triton.testing.do_bench(fn, warmup=2, rep=8, quantiles=quantiles)


def _configs() -> list[triton.Config]:
    if _interpreting():  # one small tile: the interpreter runs every program in Python
        return [triton.Config({"BM": 32, "BN": 32, "BK": 64, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    shapes = [  # (BM, BN, BK, warps, stages): Hopper-sized tiles and smaller ones for thin layers; few, since each
        # config is compiled per kernel variant on first use
        (128, 128, 128, 8, 3),
        (128, 256, 128, 8, 3),
        (128, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles much larger than the problem (they only waste the tuning time)."""
    m, n = named_args["M"], named_args["N"]
    kept = [c for c in configs if c.kwargs["BM"] <= max(64, triton.next_power_of_2(m))
            and c.kwargs["BN"] <= max(64, triton.next_power_of_2(n))]
    return kept or configs[-1:]


@triton.autotune(configs=_configs(), key=["M", "N", "C", "H", "W", "KH", "KW", "W4", "HAS_W_OFF"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=quick_bench)
@triton.jit
def _qmm_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, bias_ptr, row_ptr, a_scale_ptr, a_off_ptr,
    w_scale_ptr, w_off_ptr, w_sum_ptr, w_zero_ptr,
    M, N, C, H, W, HO, WO,
    sxb, sxh, sxw, sxc, swn, som, srm,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    KH: tl.constexpr, KW: tl.constexpr, IS_CONV: tl.constexpr, W4: tl.constexpr, HAS_W_OFF: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped launch order: programs that run together share A rows and W columns in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    row = tl.load(row_ptr)
    oa = tl.load(a_off_ptr + row)
    pad_code = (-oa).to(tl.int32).to(tl.int8)  # the code of a real zero, for out-of-image taps

    STEP: tl.constexpr = BK // 2 if W4 else BK  # channels of one half per step
    channels = C // 2 if W4 else C  # stored channels per tap (4-bit: bytes)
    rc = tl.arange(0, STEP)
    if IS_CONV:
        ow = rm % WO
        oh = (rm // WO) % HO
        ob = rm // (WO * HO)
    else:
        base = rm.to(tl.int64) * sxb
        inside = m_ok
    if W4:
        wz = tl.load(w_zero_ptr + rn, mask=n_ok, other=0).to(tl.int8)

    acc = tl.zeros((BM, BN), dtype=tl.int32)
    asum = tl.zeros((BM,), dtype=tl.int32)
    steps = tl.cdiv(channels, STEP)
    for it in range(0, KH * KW * steps):
        tap = it // steps
        cc = (it % steps) * STEP + rc
        c_ok = cc < channels
        if IS_CONV:
            ih = oh * STRIDE_H - PAD_H + tap // KW
            iw = ow * STRIDE_W - PAD_W + tap % KW
            inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            base = ob.to(tl.int64) * sxb + ih * sxh + iw * sxw
        a_ptrs = x_ptr + base[:, None] + cc[None, :] * sxc
        a_mask = inside[:, None] & c_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0)
        if IS_CONV:
            a = tl.where((~inside)[:, None] & c_ok[None, :], pad_code, a)
        w_ptrs = w_ptr + rn[None, :] * swn + tap * channels + cc[:, None]
        w = tl.load(w_ptrs, mask=n_ok[None, :] & c_ok[:, None], other=0)
        if W4:
            a_hi = tl.load(a_ptrs + channels * sxc, mask=a_mask, other=0)
            if IS_CONV:
                a_hi = tl.where((~inside)[:, None] & c_ok[None, :], pad_code, a_hi)
            lo = tl.where(c_ok[:, None], (w & 0xF).to(tl.int8) - wz[None, :], 0).to(tl.int8)
            hi = tl.where(c_ok[:, None], (w >> 4).to(tl.int8) - wz[None, :], 0).to(tl.int8)
            acc = tl.dot(a, lo, acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, hi, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            if HAS_W_OFF:
                asum += tl.sum(a.to(tl.int32), axis=1)

    # epilogue: y = sa sw[n] (acc + oa wsum[n] + ow[n] (asum + K oa)) + bias[n] + residual
    sa = tl.load(a_scale_ptr + row)
    sw = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    wsum = tl.load(w_sum_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) + oa * wsum[None, :]
    if HAS_W_OFF:
        wo = tl.load(w_off_ptr + rn, mask=n_ok, other=0.0)
        y += wo[None, :] * (asum.to(tl.float32)[:, None] + (KH * KW * C) * oa)
    y = y * (sa * sw)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + rm[:, None].to(tl.int64) * srm + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * som + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=out_mask)


def _launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None,
            bias: torch.Tensor | None, row: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor,
            w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
            m: int, n: int, c: int, hw: tuple[int, int], out_hw: tuple[int, int], x_strides: tuple[int, int, int, int],
            kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], is_conv: bool) -> None:
    w4 = w_zero is not None
    if w4 and c % 2:
        raise ValueError(f"4-bit weights need an even input channel count, got {c}")
    dummy = w_scale  # placeholder pointer for absent optional operands (never read)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _qmm_kernel[grid](
        x, w, out, residual if residual is not None else dummy, bias if bias is not None else dummy, row,
        a_scale, a_offset, w_scale, w_offset if w_offset is not None else dummy, w_sum,
        w_zero if w4 else dummy,
        m, n, c, hw[0], hw[1], out_hw[0], out_hw[1],
        *x_strides, w.stride(0), out.stride(0) if not is_conv else n, n if residual is not None else 0,
        stride[0], stride[1], padding[0], padding[1],
        KH=kernel[0], KW=kernel[1], IS_CONV=is_conv, W4=w4, HAS_W_OFF=w_offset is not None,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None,
    )


def gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, row: torch.Tensor,
         w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
         bias: torch.Tensor | None, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of ``reference.gemm``: ``a [M, K]`` int8 codes (unit stride along K) -> ``[M, N]``."""
    m, k = a.shape
    n = w.shape[0]
    if a.stride(1) != 1:
        a = a.contiguous()
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if residual is not None:
        residual = residual.contiguous()
    _launch(a, w, out, residual, bias, row, a_scale, a_offset, w_scale, w_offset, w_sum, w_zero,
            m, n, k, (1, 1), (1, 1), (a.stride(0), 0, 0, 1), (1, 1), (1, 1), (0, 0), is_conv=False)
    return out


def conv2d(x: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, row: torch.Tensor,
           w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
           bias: torch.Tensor | None, residual: torch.Tensor | None, kernel_size: tuple[int, int],
           stride: tuple[int, int], padding: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of ``reference.conv2d``: ``x [B, C, H, W]`` int8 codes (any strides; channels-last is fast) ->
    ``[B, N, Ho, Wo]`` in channels-last memory."""
    batch, c, h, wd = x.shape
    kh, kw = kernel_size
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (wd + 2 * padding[1] - kw) // stride[1] + 1
    n = w.shape[0]
    out = torch.empty((batch, ho, wo, n), device=x.device, dtype=out_dtype)
    if residual is not None:
        residual = residual.permute(0, 2, 3, 1).contiguous()
    sb, sc, sh, sw = x.stride()
    _launch(x, w, out, residual, bias, row, a_scale, a_offset, w_scale, w_offset, w_sum, w_zero,
            batch * ho * wo, n, c, (h, wd), (ho, wo), (sb, sh, sw, sc), kernel_size, stride, padding, is_conv=True)
    return out.permute(0, 3, 1, 2)
