"""Triton GEMM on int8 codes for linear layers, and channels-last implicit-GEMM convolutions.

The math and the storage formats are those of ``kernels/reference.py`` (its module docstring). What these kernels
add to it:

- **Linear layers** load their tiles with TMA tensor descriptors on Hopper (out-of-range rows and columns arrive
  as zeros: no masks, no address arithmetic), with pointer tiles elsewhere (``QUESTDIFF_TMA=0``; the interpreter,
  unaligned shapes). The main loop is only loads and int8 tensor-core dots:
  the code sums that an 8-bit weight offset needs come from the quantize step (``a_sum``), not from the loop.
- **Implicit GEMM.** A conv is a GEMM with ``M = batch * Ho * Wo`` output pixels, ``N = C_out`` and
  ``K = kh * kw * C_in``; the A tile of each (tap, channel block) step is gathered from the channels-last input
  codes, out-of-image taps read the code of a real zero of the sample's row. The epilogue adds up the per-pixel
  code sums of the taps when the weights have an offset.
- **Fused epilogue.** Zero-point corrections, per-token (per-sample row) activation and per-channel weight
  dequantization, bias and an optional residual are applied to the int32 accumulator in registers; the output is
  written once, in the model's dtype.
- **4-bit weights** are unpacked in registers: each packed step holds channels ``[c, c + BK/2)`` and the same block
  of the upper channel half, so one step runs two ``BK/2``-deep int8 dots without shuffles.
- **FP8 (e4m3) codes** run the same kernels with fp32 accumulation (``FP8``, from the codes' dtype): symmetric grids,
  so the zero-point terms vanish (their tables are zeros) and a real zero is code 0.

Tiles are autotuned per shape; the timestep rows and the scale tables are read on the device, so a launch needs no
host sync and is CUDA-graph safe.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (CPU tests): one small tile per kernel then."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def quick_bench(fn, quantiles):  # noqa: ANN001 - the autotuner's do_bench hook
    """Autotuning timer: ~10 ms per config instead of Triton's default 125 (a UNet has ~50 GEMM shapes per batch
    size: at 25 ms per config the first SD-1.5 call took 199 s on the H200, compiles included)."""
    return triton.testing.do_bench(fn, warmup=2, rep=8, quantiles=quantiles)


@functools.cache
def tma_available() -> bool:
    """TMA descriptors for the linear kernel: on a Hopper-class GPU with a Triton that has them (measured on the H200,
    Triton 3.6, CUDA-graph timing: 3-8% faster than pointer tiles at the SD-1.5 shapes). ``QUESTDIFF_TMA=0`` uses
    pointer tiles; ``QUESTDIFF_TMA=1`` also runs TMA in the interpreter (tests)."""
    choice = os.environ.get("QUESTDIFF_TMA")
    if choice == "0":
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    if interpreting():
        return choice == "1"
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def autotuning() -> bool:
    """``QUESTDIFF_TUNE=0`` keeps only the first tile of each kernel (GPU tests: correctness, not speed, and one
    compile per kernel variant instead of one per tile)."""
    return os.environ.get("QUESTDIFF_TUNE", "1") != "0"


def _tiles(shapes: list[tuple[int, int, int, int, int]], pre_hook=None) -> list[triton.Config]:  # noqa: ANN001
    if interpreting():  # one small tile: the interpreter runs every program in Python
        return [triton.Config({"BM": 32, "BN": 32, "BK": 64, "GROUP_M": 2}, num_warps=4, num_stages=1,
                              pre_hook=pre_hook)]
    if not autotuning():
        shapes = shapes[:1]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=pre_hook)
            for bm, bn, bk, w, s in shapes]


# (BM, BN, BK, warps, stages): Hopper-sized tiles and smaller ones for thin layers (the plain-Triton ceiling probe's
# set); few, since each config is compiled per kernel variant on first use
_GEMM_TILES = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4),
               (128, 64, 128, 4, 4), (256, 128, 128, 8, 3)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles much larger than the problem (they only waste the tuning time)."""
    m, n = named_args["M"], named_args["N"]
    kept = [c for c in configs if c.kwargs["BM"] <= max(64, triton.next_power_of_2(m))
            and c.kwargs["BN"] <= max(64, triton.next_power_of_2(n))]
    return kept or configs[-1:]


def _set_tma_blocks(nargs: dict) -> None:
    """Autotuner pre-hook: the TMA descriptors' block shapes follow the tile being tried."""
    if not nargs["TMA"]:
        return
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    step = bk // 2 if nargs["W4"] else bk
    nargs["a"].block_shape = [bm, step]
    nargs["w"].block_shape = [bn, step]


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: programs that run together share A rows and W columns in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _dequantize_store(acc, asum, rm, rn, M, N, rows_ptr, ROWS_PER_T, a_scale_ptr, a_off_ptr, w_scale_ptr, w_off_ptr,
                      w_sum_ptr, bias_ptr, res_ptr, out_ptr, out_offsets, res_offsets, KTOT,
                      HAS_W_OFF: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """y = sa[m] sw[n] (acc + oa[m] wsum[n] + ow[n] (asum[m] + K oa[m])) + bias[n] + residual, stored in out's dtype
    at ``out_offsets`` ([BM, BN] element offsets; the residual is read at ``res_offsets``)."""
    m_ok = rm < M
    n_ok = rn < N
    row = tl.load(rows_ptr + rm // ROWS_PER_T, mask=m_ok, other=0)
    sa = tl.load(a_scale_ptr + row, mask=m_ok, other=0.0)
    oa = tl.load(a_off_ptr + row, mask=m_ok, other=0.0)
    sw = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    wsum = tl.load(w_sum_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) + oa[:, None] * wsum[None, :]
    if HAS_W_OFF:
        wo = tl.load(w_off_ptr + rn, mask=n_ok, other=0.0)
        y += wo[None, :] * (asum.to(tl.float32)[:, None] + KTOT * oa[:, None])
    y = y * (sa[:, None] * sw[None, :])
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + res_offsets, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def _linear_configs() -> list[triton.Config]:
    return _tiles(_GEMM_TILES, pre_hook=_set_tma_blocks)


@triton.autotune(configs=_linear_configs(), key=["M", "N", "K", "W4", "FP8", "TMA"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=quick_bench)
@triton.jit
def _linear_kernel(
    a, w, out_ptr, res_ptr, bias_ptr, rows_ptr, a_scale_ptr, a_off_ptr, w_scale_ptr, w_off_ptr, w_sum_ptr,
    a_sum_ptr, w_zero_ptr,
    M, N, K, ROWS_PER_T, sam, swn, som, srm,
    TMA: tl.constexpr, W4: tl.constexpr, FP8: tl.constexpr, HAS_W_OFF: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ``a`` / ``w``: TMA descriptors of the codes [M, K] / weights [N, K] (4-bit: [N, K/2] packed), or pointers
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN
    rm = off_m + tl.arange(0, BM)
    rn = off_n + tl.arange(0, BN)
    if FP8:  # e4m3 codes: fp32 accumulation (no zero points: the epilogue's offset tables are zeros)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    if W4:
        STEP: tl.constexpr = BK // 2
        half = K // 2
        rk = tl.arange(0, STEP)
        wz = tl.load(w_zero_ptr + rn, mask=rn < N, other=0).to(tl.int8)
        for j in range(0, half, STEP):
            k_ok = (j + rk) < half  # columns past the lower half belong to the upper one: their weights count 0
            if TMA:
                a_lo = a.load([off_m, j])
                a_hi = a.load([off_m, j + half])
                packed = w.load([off_n, j])
            else:
                a_rows = a + (rm % M)[:, None] * sam
                a_lo = tl.load(a_rows + (j + rk)[None, :], mask=k_ok[None, :], other=0)
                a_hi = tl.load(a_rows + (half + j + rk)[None, :], mask=k_ok[None, :], other=0)
                packed = tl.load(w + (rn % N)[:, None] * swn + (j + rk)[None, :], mask=k_ok[None, :], other=0)
            lo = tl.where(k_ok[None, :], (packed & 0xF).to(tl.int8) - wz[:, None], 0).to(tl.int8)
            hi = tl.where(k_ok[None, :], (packed >> 4).to(tl.int8) - wz[:, None], 0).to(tl.int8)
            acc = tl.dot(a_lo, tl.trans(lo), acc, out_dtype=acc.dtype)
            acc = tl.dot(a_hi, tl.trans(hi), acc, out_dtype=acc.dtype)
    else:
        rk = tl.arange(0, BK)
        if not TMA:
            a_ptrs = a + (rm % M)[:, None] * sam + rk[None, :]
            w_ptrs = w + (rn % N)[None, :] * swn + rk[:, None]
        for k in range(0, K, BK):
            if TMA:
                x = a.load([off_m, k])
                y = tl.trans(w.load([off_n, k]))
            else:
                x = tl.load(a_ptrs, mask=(k + rk)[None, :] < K, other=0)
                y = tl.load(w_ptrs, mask=(k + rk)[:, None] < K, other=0)
                a_ptrs += BK
                w_ptrs += BK
            if FP8:  # fp8 codes travel as their bytes (0 = +0.0): masked loads need no fp8 "other"
                x = x.to(tl.float8e4nv, bitcast=True)
                y = y.to(tl.float8e4nv, bitcast=True)
            acc = tl.dot(x, y, acc, out_dtype=acc.dtype)
    asum = acc  # unused placeholder unless the weights have an offset
    if HAS_W_OFF:
        asum = tl.load(a_sum_ptr + rm, mask=rm < M, other=0)
    out_offsets = rm[:, None].to(tl.int64) * som + rn[None, :]
    res_offsets = rm[:, None].to(tl.int64) * srm + rn[None, :]
    _dequantize_store(acc, asum, rm, rn, M, N, rows_ptr, ROWS_PER_T, a_scale_ptr, a_off_ptr, w_scale_ptr, w_off_ptr,
                      w_sum_ptr, bias_ptr, res_ptr, out_ptr, out_offsets, res_offsets, K, HAS_W_OFF, HAS_BIAS, HAS_RES)


def _conv_configs() -> list[triton.Config]:
    return _tiles([(128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (64, 128, 128, 4, 4),
                   (128, 64, 128, 4, 4), (256, 128, 64, 8, 3)])


@triton.autotune(configs=_conv_configs(), key=["M", "N", "C", "H", "W", "KH", "KW", "W4", "FP8", "HAS_W_OFF"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=quick_bench)
@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, bias_ptr, rows_ptr, a_scale_ptr, a_off_ptr,
    w_scale_ptr, w_off_ptr, w_sum_ptr, a_sum_ptr, w_zero_ptr,
    M, N, C, H, W, HO, WO, ROWS_PER_T,
    sxb, sxh, sxw, swn, sob, sop, son, srb, srp, srn,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, W4: tl.constexpr, FP8: tl.constexpr, HAS_W_OFF: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # x: channels-last codes (unit channel stride); out/residual: [B, N, Ho, Wo] at strides (batch, pixel, channel)
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    # the code of a real zero of each output pixel's sample row, for out-of-image taps
    oa = tl.load(a_off_ptr + tl.load(rows_ptr + rm // ROWS_PER_T, mask=m_ok, other=0), mask=m_ok, other=0.0)
    pad_code = (-oa).to(tl.int32).to(tl.int8)

    STEP: tl.constexpr = BK // 2 if W4 else BK  # channels of one half per step
    channels = C // 2 if W4 else C  # stored channels per tap (4-bit: bytes)
    rc = tl.arange(0, STEP)
    ow = rm % WO
    oh = (rm // WO) % HO
    ob = rm // (WO * HO)
    if W4:
        wz = tl.load(w_zero_ptr + rn, mask=n_ok, other=0).to(tl.int8)

    if FP8:  # e4m3 codes: fp32 accumulation; a real zero is code 0 (pad_code is 0: the offset table is zeros)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    for tap in tl.static_range(KH * KW):  # per tap: one gather base per output pixel, then a plain GEMM K loop
        ih = oh * STRIDE_H - PAD_H + (tap // KW) * DIL_H
        iw = ow * STRIDE_W - PAD_W + (tap % KW) * DIL_W
        inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_ptrs = x_ptr + (ob.to(tl.int64) * sxb + ih * sxh + iw * sxw)[:, None] + rc[None, :]
        w_ptrs = w_ptr + (rn % N)[None, :] * swn + tap * channels + rc[:, None]  # columns past N: masked at the store
        for c0 in range(0, channels, STEP):
            c_ok = (c0 + rc) < channels
            if FP8:  # fp8 codes travel as their bytes (0 = +0.0, a real zero: the padding too)
                a = tl.load(a_ptrs, mask=inside[:, None] & c_ok[None, :], other=0).to(tl.float8e4nv, bitcast=True)
                w = tl.load(w_ptrs, mask=c_ok[:, None], other=0).to(tl.float8e4nv, bitcast=True)
            else:
                a = tl.load(a_ptrs, mask=inside[:, None] & c_ok[None, :], other=pad_code[:, None])
                w = tl.load(w_ptrs, mask=c_ok[:, None], other=0)
            if W4:
                a_hi = tl.load(a_ptrs + channels, mask=inside[:, None] & c_ok[None, :], other=pad_code[:, None])
                lo = tl.where(c_ok[:, None], (w & 0xF).to(tl.int8) - wz[None, :], 0).to(tl.int8)
                hi = tl.where(c_ok[:, None], (w >> 4).to(tl.int8) - wz[None, :], 0).to(tl.int8)
                acc = tl.dot(a, lo, acc, out_dtype=acc.dtype)
                acc = tl.dot(a_hi, hi, acc, out_dtype=acc.dtype)
            else:
                acc = tl.dot(a, w, acc, out_dtype=acc.dtype)
            a_ptrs += STEP
            w_ptrs += STEP

    asum = acc  # unused placeholder unless the weights have an offset
    if HAS_W_OFF:  # sum of the A codes over the receptive field: per-pixel sums of the taps inside, zero code outside
        asum = tl.zeros((BM,), dtype=tl.int32)
        for tap in tl.static_range(KH * KW):
            ih = oh * STRIDE_H - PAD_H + (tap // KW) * DIL_H
            iw = ow * STRIDE_W - PAD_W + (tap % KW) * DIL_W
            inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pixel = (ob * H + ih) * W + iw
            asum += tl.where(inside, tl.load(a_sum_ptr + pixel, mask=inside, other=0), pad_code.to(tl.int32) * C)
    pix = (rm % (HO * WO)).to(tl.int64)
    ob64 = ob.to(tl.int64)
    out_offsets = (ob64 * sob + pix * sop)[:, None] + rn[None, :].to(tl.int64) * son
    res_offsets = (ob64 * srb + pix * srp)[:, None] + rn[None, :].to(tl.int64) * srn
    _dequantize_store(acc, asum, rm, rn, M, N, rows_ptr, ROWS_PER_T, a_scale_ptr, a_off_ptr, w_scale_ptr, w_off_ptr,
                      w_sum_ptr, bias_ptr, res_ptr, out_ptr, out_offsets, res_offsets, KH * KW * C, HAS_W_OFF,
                      HAS_BIAS, HAS_RES)


def _rows_per_t(m: int, rows: torch.Tensor) -> int:
    if m % rows.numel():
        raise ValueError(f"{m} tokens cannot be split over {rows.numel()} timestep rows")
    return m // rows.numel()


def gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, rows: torch.Tensor,
         w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
         a_sum: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
         out_dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of ``reference.gemm``: ``a [M, K]`` int8 codes -> ``[M, N]``; ``a_sum [M]`` (int32 code sums of
    the rows of ``a``) is required when ``w_offset`` is given."""
    m, k = a.shape
    n = w.shape[0]
    w4 = w_zero is not None
    if w4 and k % 2:
        raise ValueError(f"4-bit weights need an even input channel count, got {k}")
    if w_offset is not None and a_sum is None:
        raise ValueError("8-bit weights with an offset need the activation code sums (a_sum)")
    fp8 = a.dtype == torch.float8_e4m3fn
    if a.stride(1) != 1:
        a = a.contiguous()
    w2 = w.reshape(n, -1)
    if fp8:  # the kernel loads the bytes and reinterprets them (see FP8 in the kernels)
        a, w2 = a.view(torch.uint8), w2.view(torch.uint8)
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if residual is not None:
        residual = residual.contiguous()
    # TMA needs 16-byte aligned bases and row strides (and, at 4 bits, a K half that starts on one)
    use_tma = (tma_available() and a.stride(0) % 16 == 0 and w2.stride(0) % 16 == 0 and (not w4 or k % 32 == 0)
               and a.data_ptr() % 16 == 0 and w2.data_ptr() % 16 == 0)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_arg = TensorDescriptor.from_tensor(a, [16, 16])  # block shapes: set per tile by the autotuner's pre-hook
        w_arg = TensorDescriptor.from_tensor(w2, [16, 16])
    else:
        a_arg, w_arg = a, w2
    dummy = w_scale  # placeholder pointer for absent optional operands (never read)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _linear_kernel[grid](
        a_arg, w_arg, out, residual if residual is not None else dummy, bias if bias is not None else dummy, rows,
        a_scale, a_offset, w_scale, w_offset if w_offset is not None else dummy, w_sum,
        a_sum if a_sum is not None else dummy, w_zero if w4 else dummy,
        m, n, k, _rows_per_t(m, rows), a.stride(0), w2.stride(0), out.stride(0), n if residual is not None else 0,
        TMA=use_tma, W4=w4, FP8=fp8, HAS_W_OFF=w_offset is not None,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None,
    )
    return out


def conv2d(x: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, rows: torch.Tensor,
           w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
           a_sum: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
           kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], out_dtype: torch.dtype, channels_last: bool = True) -> torch.Tensor:
    """Triton twin of ``reference.conv2d``: ``x [B, C, H, W]`` int8 codes (channels-last memory is read as it is;
    any other layout is copied to it first) -> ``[B, N, Ho, Wo]``, in channels-last memory or, with
    ``channels_last=False``, contiguous NCHW (the layout of the model around it: no copy before the next op);
    ``a_sum [B * H * W]`` (per-pixel code sums over the channels) is required when ``w_offset`` is given."""
    batch, c, h, wd = x.shape
    kh, kw = kernel_size
    dh, dw = dilation
    ho = (h + 2 * padding[0] - dh * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dw * (kw - 1) - 1) // stride[1] + 1
    n = w.shape[0]
    if w_zero is not None and c % 2:
        raise ValueError(f"4-bit weights need an even input channel count, got {c}")
    if w_offset is not None and a_sum is None:
        raise ValueError("8-bit weights with an offset need the activation code sums (a_sum)")
    fp8 = x.dtype == torch.float8_e4m3fn
    if x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    if fp8:  # the kernel loads the bytes and reinterprets them (see FP8 in the kernels)
        x, w = x.view(torch.uint8), w.view(torch.uint8)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((batch, n, ho, wo), device=x.device, dtype=out_dtype, memory_format=layout)
    if residual is not None:
        residual = residual.contiguous(memory_format=layout)
    res = residual if residual is not None else out
    sb, _, sh, sw = x.stride()
    m = batch * ho * wo
    dummy = w_scale
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _conv_kernel[grid](
        x, w, out, residual if residual is not None else dummy, bias if bias is not None else dummy, rows,
        a_scale, a_offset, w_scale, w_offset if w_offset is not None else dummy, w_sum,
        a_sum if a_sum is not None else dummy, w_zero if w_zero is not None else dummy,
        m, n, c, h, wd, ho, wo, _rows_per_t(m, rows), sb, sh, sw, w.stride(0),
        out.stride(0), out.stride(3), out.stride(1), res.stride(0), res.stride(3), res.stride(1),
        stride[0], stride[1], padding[0], padding[1], dh, dw,
        KH=kh, KW=kw, W4=w_zero is not None, FP8=fp8, HAS_W_OFF=w_offset is not None,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None,
    )
    return out
