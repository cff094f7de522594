"""Triton 8-bit attention on int8 codes: ``q kᵀ`` and ``P v`` as int8 tensor-core dots, never materialising the
scores (the Triton twin of ``reference.attention``).

The fake-quant model quantizes the *normalised* probabilities on a fixed grid (``round(P / sp)``), so each row's
softmax max and sum must be known before any ``P`` is quantized. The kernel makes two passes over the keys: the
first computes the row max and sum online (as flash attention does), the second recomputes the scores, quantizes
``P`` exactly as the fake quantizer does and accumulates ``P_q v`` in int32. That is three int8 dots per key block
instead of flash attention's two bf16 ones.

Zero points become corrections of the int32 dots (codes ``c`` mean ``s (c + o)``):
``q̂ k̂ᵀ = sq sk (q kᵀ + ok Σ_d q + oq Σ_d k + D oq ok)`` and, with probability codes ``P_q - 128``,
``P̂ v̂ = sp sv ((P_q - 128) v + 128 Σ_j v + ov Σ_j P_q)``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_gemm import quick_bench
from .triton_quant import round_half_even



def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]]


@triton.autotune(configs=_configs(), key=["LQ", "LK", "BLOCK_D"], do_bench=quick_bench)
@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, row_ptr, scale_ptr, off_ptr,
    LQ, LK, H, D,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    sm_scale, p_max,
    P_OFF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row = tl.load(row_ptr)
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
              row: torch.Tensor, sm_scale: float, p_max: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of ``reference.attention`` (no mask): codes ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` with
    unit stride along D -> ``[B, Lq, H, D]`` of ``out_dtype``."""
    batch, lq, heads, d = q.shape
    lk = k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((batch, lq, heads, d), device=q.device, dtype=out_dtype)
    block_d = max(32, triton.next_power_of_2(d))
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attention_kernel[grid](
        q, k, v, out, row, scales, offsets, lq, lk, heads, d,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        float(sm_scale), float(p_max), P_OFF=128 if p_max > 127 else 0, BLOCK_D=block_d,
    )
    return out
