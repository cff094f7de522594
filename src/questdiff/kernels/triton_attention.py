"""Triton 8-bit attention on int8 codes, never materialising the scores (the Triton twins of
``reference.attention_qk`` and ``reference.attention``).

``attention_qk`` (the "qk" format, the default): one pass over the keys, as flash attention does. ``q kᵀ`` is an
int8 tensor-core dot on codes with static per-timestep scales (SageAttention's design; q and k on symmetric grids,
k centred on its token mean before quantization, so the scores need no zero-point terms), the softmax runs online
in fp32 and ``P v`` is a dot in ``v``'s 16-bit dtype with fp32 accumulation.

``attention`` (the "qkvp" format, QuEST's original): the *normalised* probabilities are quantized on a fixed grid
(``round(P / sp)``), so each row's softmax max and sum must be known before any ``P`` is quantized: two passes over
the keys (row statistics online, then recompute, quantize ``P`` as the fake quantizer does and accumulate
``P_q v`` in int32), three int8 dots per key block instead of two. Zero points become corrections of the int32 dots
(codes ``c`` mean ``s (c + o)``): ``q̂ k̂ᵀ = sq sk (q kᵀ + ok Σ_d q + oq Σ_d k + D oq ok)`` and, with probability codes
``P_q - 128``, ``P̂ v̂ = sp sv ((P_q - 128) v + 128 Σ_j v + ov Σ_j P_q)``.

Both read each sample's timestep row on the device (``rows``; reference.py's conventions).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gemm import autotuning, interpreting, quick_bench
from .triton_quant import round_half_even


def _qk_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    tiles = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in (tiles if autotuning() else tiles[:1])]


@triton.autotune(configs=_qk_configs(), key=["LQ", "LK", "BLOCK_D", "EVEN_D"], do_bench=quick_bench)
@triton.heuristics({"EVEN_N": lambda args: args["LK"] % args["BLOCK_N"] == 0})
@triton.jit
def _attention_qk_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, q_scale_ptr, k_scale_ptr,
    LQ, LK, H, D, IMAGES_PER_ROW,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    sm_scale,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row = tl.load(rows_ptr + b // IMAGES_PER_ROW)
    # scores in log2 units (exp2 below): one multiply per score
    score_scale = tl.load(q_scale_ptr + row) * tl.load(k_scale_ptr + row) * sm_scale * 1.4426950408889634
    b = b.to(tl.int64)
    h = h.to(tl.int64)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rj = tl.arange(0, BLOCK_N)
    d_ok = rd < D
    q = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None] * sql + rd[None, :],
                mask=(rm < LQ)[:, None] & d_ok[None, :], other=0)
    k_ptrs = k_ptr + b * skb + h * skh + rj[:, None] * skl + rd[None, :]
    v_ptrs = v_ptr + b * svb + h * svh + rj[:, None] * svl + rd[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, LK, BLOCK_N):
        if EVEN_N and EVEN_D:  # no masks on the hot path
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            kv_mask = ((start + rj) < LK)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        if not EVEN_N:
            qk = tl.where(((start + rj) < LK)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * score_scale)  # score_scale > 0
        p = tl.math.exp2(qk * score_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        k_ptrs += BLOCK_N * skl
        v_ptrs += BLOCK_N * svl
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + rm[:, None] * sol + rd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rm < LQ)[:, None] & d_ok[None, :])


def _launch(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,  # noqa: ANN001
            tables: tuple[torch.Tensor, torch.Tensor], out_dtype: torch.dtype, *scalars: float,
            **constexprs: int) -> torch.Tensor:
    """Run an attention kernel on ``[B, L, H, D]`` operands (unit stride along D: copied if not) with the shared
    argument layout (operands, output, rows, two tables, sizes, strides); returns ``[B, Lq, H, D]``."""
    batch, lq, heads, d = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if batch % rows.numel():
        raise ValueError(f"a batch of {batch} cannot take per-sample rows for {rows.numel()} timesteps")
    out = torch.empty((batch, lq, heads, d), device=q.device, dtype=out_dtype)
    block_d = max(32, triton.next_power_of_2(d))
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel[grid](
        q, k, v, out, rows, *tables, lq, k.shape[1], heads, d, batch // rows.numel(),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *scalars, BLOCK_D=block_d, **constexprs,
    )
    return out


def attention_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                 rows: torch.Tensor, sm_scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of ``reference.attention_qk`` (no mask): codes ``q [B, Lq, H, D]``, ``k [B, Lk, H, D]``, values
    ``v [B, Lk, H, D]`` (16-bit or fp32) -> ``[B, Lq, H, D]`` of ``out_dtype``."""
    d = q.shape[-1]
    return _launch(_attention_qk_kernel, q, k, v, rows, (q_scale, k_scale), out_dtype, float(sm_scale),
                   EVEN_D=max(32, triton.next_power_of_2(d)) == d)


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    tiles = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in (tiles if autotuning() else tiles[:1])]


@triton.autotune(configs=_configs(), key=["LQ", "LK", "BLOCK_D"], do_bench=quick_bench)
@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, scale_ptr, off_ptr,
    LQ, LK, H, D, IMAGES_PER_ROW,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    sm_scale, p_max,
    P_OFF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = (bh % H).to(tl.int64)
    row = tl.load(rows_ptr + b // IMAGES_PER_ROW)
    b = b.to(tl.int64)
    sq = tl.load(scale_ptr + row * 4)
    sk = tl.load(scale_ptr + row * 4 + 1)
    sv = tl.load(scale_ptr + row * 4 + 2)
    sp = tl.load(scale_ptr + row * 4 + 3)
    oq = tl.load(off_ptr + row * 4)
    ok = tl.load(off_ptr + row * 4 + 1)
    ov = tl.load(off_ptr + row * 4 + 2)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rj = tl.arange(0, BLOCK_N)
    d_ok = rd < D
    q = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None] * sql + rd[None, :],
                mask=(rm < LQ)[:, None] & d_ok[None, :], other=0)
    qsum = tl.sum(q.to(tl.int32), axis=1).to(tl.float32)
    score_scale = sq * sk * sm_scale * 1.4426950408889634  # scores in log2 units: exp2 below
    row_term = ok * qsum + D * oq * ok  # [BLOCK_M]
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    # pass 1: row max and row sum of exp, online
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, LK, BLOCK_N):
        j_ok = (start + rj) < LK
        k = tl.load(k_base + (start + rj)[:, None] * skl + rd[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0)
        ksum = tl.sum(k.to(tl.int32), axis=1).to(tl.float32)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        s = (s + row_term[:, None] + oq * ksum[None, :]) * score_scale
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new

    # pass 2: quantized probabilities times v
    to_grid = 1.0 / (l_i * sp)  # P / sp = exp2(s - m) / (l sp): one multiply per probability
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.int32)
    vsum = tl.zeros((BLOCK_D,), dtype=tl.int32)
    psum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for start in range(0, LK, BLOCK_N):
        j_ok = (start + rj) < LK
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + (start + rj)[:, None] * skl + rd[None, :], mask=kv_mask, other=0)
        ksum = tl.sum(k.to(tl.int32), axis=1).to(tl.float32)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        s = (s + row_term[:, None] + oq * ksum[None, :]) * score_scale
        p = tl.math.exp2(s - m_i[:, None]) * to_grid[:, None]
        pq = tl.minimum(tl.maximum(round_half_even(p), 0.0), p_max)
        pq = tl.where(j_ok[None, :], pq, 0.0).to(tl.int32)
        v = tl.load(v_base + (start + rj)[:, None] * svl + rd[None, :], mask=kv_mask, other=0)
        acc = tl.dot((pq - P_OFF).to(tl.int8), v, acc, out_dtype=tl.int32)
        vsum += tl.sum(v.to(tl.int32), axis=0)
        psum += tl.sum(pq, axis=1)
    out = (acc.to(tl.float32) + P_OFF * vsum.to(tl.float32)[None, :] + ov * psum.to(tl.float32)[:, None]) * (sp * sv)
    tl.store(o_ptr + b * sob + h * soh + rm[:, None] * sol + rd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rm < LQ)[:, None] & d_ok[None, :])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              rows: torch.Tensor, sm_scale: float, p_max: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of ``reference.attention`` (no mask): codes ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` ->
    ``[B, Lq, H, D]`` of ``out_dtype``."""
    return _launch(_attention_kernel, q, k, v, rows, (scales, offsets), out_dtype, float(sm_scale), float(p_max),
                   P_OFF=128 if p_max > 127 else 0)
