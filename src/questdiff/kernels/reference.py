"""Pure-torch twins of the low-bit kernels: the oracle of their tests and the CPU backend.

Conventions shared with the Triton kernels (``kernels/triton_*.py``):

- **Codes.** A quantized tensor is stored as int8 *codes* ``c = q - o`` where ``q`` is the integer of the fake-quant
  grid and ``o`` an offset that makes it fit int8 (128 for an unsigned 8-bit grid ``[0, 255]``, 0 otherwise). The
  real value is ``scale * (c + offset)`` with ``offset = o - zero_point``: every fake-quant value is reproduced
  exactly, and an integer matmul over codes is exact in int32. On the FP8 grid the codes are ``float8_e4m3fn``
  values ``c = e4m3(x / scale)`` (symmetric: offsets and weight sums are zero) and a GEMM accumulates in fp32.
- **Timestep rows, per sample.** Static activation scales live in ``[T]`` tables; ``rows`` (int64 ``[R]``, on the
  device: no host sync, CUDA-graph safe) holds the table row of each of ``R`` consecutive equal parts of the batch.
  An operand of ``M`` tokens (pixels) with the batch outermost gives token ``m`` the row ``rows[m // (M / R)]``
  (``R = 1``: one row for the whole batch; ``R = B``: one per sample, for batches mixing timesteps).
- **Activation layout.** The GEMMs read activation codes as ``[M, C]`` tokens x channels (channels last, contiguous;
  a conv's ``[B, C, H, W]`` codes in channels-last memory), with optional per-token code sums ``a_sum [M]`` int32
  (needed only for 8-bit weights with an offset; the quantize step produces them, so no GEMM main loop sums).
- **Weights** are ``[N, taps, C]`` (a linear layer has one tap; a conv has ``kh * kw`` taps, channels last). 8-bit
  codes are int8; 4-bit codes are unsigned nibbles ``q - qmin`` packed two per byte, ``[N, taps, C / 2]`` uint8, the
  low nibble holding channel ``j`` and the high nibble channel ``j + C / 2`` of the same tap (so a kernel unpacks
  two contiguous K-halves without shuffles); their zero points (``zero_point - qmin``) are subtracted before the
  matmul, so 4-bit weights need no offset term.

The GEMM computes, for activations ``a [M, K]`` and weights ``w [N, K]`` (codes)::

    y[m, n] = sa[m] * sw[n] * (sum_k a[m,k] w[n,k] + oa[m] * wsum[n] + ow[n] * asum[m] + K * oa[m] * ow[n]) + bias[n]

with ``sa, oa`` the activation scale/offset of token ``m``'s row, ``sw, ow`` the per-output-channel weight
scale/offset, ``wsum[n] = sum_k w[n, k]`` and ``asum[m] = sum_k a[m, k]``; this is ``(sa (a + oa)) @ (sw (w + ow))^T``.

Attention ("qk" format, ``attention_qk``): q and k on symmetric static 8-bit grids (k centred on its token mean before
quantization, which leaves the softmax unchanged), ``q kᵀ`` on int8 codes, softmax and ``P v`` in floating point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fp8 import fp8_codes

INT8_OFFSET = 128  # added to an unsigned 8-bit grid to make it fit int8


def code_offset(qmin: int, qmax: int) -> int:
    """Offset ``o`` with ``[qmin - o, qmax - o]`` inside int8: 0 for grids that fit, 128 for ``[0, 255]``."""
    if qmin >= -128 and qmax <= 127:
        return 0
    if qmax - qmin <= 255:
        return qmin + 128
    raise ValueError(f"an integer grid [{qmin}, {qmax}] does not fit 8 bits")


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """int8 codes ``clamp(round(x / scale) + shift, lo, hi)`` of ``x`` (any shape; ``scale``/``shift`` broadcast).

    ``shift = zero_point - o`` and ``[lo, hi] = [qmin - o, qmax - o]``: the same integers as the fake quantizer's
    ``clamp(round(x / s) + z, qmin, qmax)``, moved by ``o``. Computed in fp32 (round half to even)."""
    codes = torch.round(x.float() / scale.float()) + shift.float()
    return codes.clamp_(lo, hi).to(torch.int8)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """``x [R, C]`` with strides exactly ``(C, 1)``: ``contiguous()`` keeps a size-1 dim's stride as it is, and
    ``torch._int_mm`` reads that stride as the leading dimension (``Linear(1, N)``'s ``[1, N]`` weight view gave
    garbage on the CPU, torch 2.13)."""
    return x if x.stride() == (x.shape[1], 1) else x.clone(memory_format=torch.contiguous_format)


def is_fp8(codes: torch.Tensor) -> bool:
    """Whether ``codes`` are FP8 e4m3 codes (symmetric grids, no zero points) rather than int8 codes."""
    return codes.dtype == torch.float8_e4m3fn


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] @ b [K, N]`` of int8 codes -> int32 (``torch._int_mm`` where it applies, else float64); FP8
    codes -> their fp32 product (each code product is exact in fp32; the sum rounds as any fp32 GEMM does)."""
    if is_fp8(a):
        return a.float() @ b.float()
    if a.device.type == "cpu" or (a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0):
        try:
            return torch._int_mm(_row_major(a), _row_major(b))
        except RuntimeError:
            pass
    return (a.double() @ b.double()).to(torch.int32)


def unpack_int4(packed: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``[N, taps, C/2]`` uint8 nibbles -> int8 weight integers ``[N, taps, C]`` (zero points ``[N]`` subtracted)."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    values = torch.cat([lo, hi], dim=-1) - zero.to(torch.int16).view(-1, 1, 1)
    return values.to(torch.int8)


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Inverse of the nibble layout: unsigned values ``[N, taps, C]`` in ``[0, 15]`` (C even) -> ``[N, taps, C/2]``."""
    if nibbles.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even channel count, got {nibbles.shape[-1]}")
    if nibbles.min() < 0 or nibbles.max() > 15:
        raise ValueError("4-bit packing takes values in [0, 15]")
    half = nibbles.shape[-1] // 2
    n = nibbles.to(torch.uint8)
    return n[..., :half] | (n[..., half:] << 4)


def weight_integers(w: torch.Tensor, w_zero: torch.Tensor | None) -> torch.Tensor:
    """int8 weight integers ``[N, taps, C]``: the codes themselves (8-bit) or the unpacked nibbles (4-bit)."""
    return unpack_int4(w, w_zero) if w_zero is not None else w


def sample_values(table: torch.Tensor, rows: torch.Tensor, items: int) -> torch.Tensor:
    """``table [T]`` at the row of each of ``items`` consecutive tokens split evenly over ``rows [R]`` -> ``[items]``."""
    if items % rows.numel():
        raise ValueError(f"{items} tokens cannot be split over {rows.numel()} timestep rows: the denoiser's timestep "
                         "argument must have one entry, or one per sample of the batch")
    return table[rows].repeat_interleave(items // rows.numel())


def quantize_tokens(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, rows: torch.Tensor, lo: int,
                    hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of tokens ``x [M, C]`` (any strides) on each token's row of the ``[T]`` tables -> ``(codes [M, C]``
    int8 contiguous, ``sums [M]`` int32 = the codes summed over ``C``)."""
    m = x.shape[0]
    codes = quantize_codes(x, sample_values(scale, rows, m)[:, None], sample_values(shift, rows, m)[:, None], lo, hi)
    return codes.contiguous(), codes.sum(dim=1, dtype=torch.int32)


def quantize_tokens_fp8(x: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 codes of tokens ``x [M, C]`` on each token's row of the ``[T]`` scale table -> ``[M, C]`` contiguous
    (``questdiff.fp8.fp8_codes``: fp32, saturating)."""
    return fp8_codes(x, sample_values(scale, rows, x.shape[0])[:, None]).contiguous()


def _epilogue(acc: torch.Tensor, asum: torch.Tensor | None, k: int, a_scale: torch.Tensor, a_offset: torch.Tensor,
              w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, bias: torch.Tensor | None,
              residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize an int32 accumulator ``[M, N]`` (see the module docstring); ``a_scale``/``a_offset`` are ``[M]``."""
    a_scale, a_offset = a_scale[:, None], a_offset[:, None]
    y = acc.float() + a_offset * w_sum
    if w_offset is not None:
        assert asum is not None
        y = y + w_offset * (asum.float()[:, None] + k * a_offset)
    y = y * (a_scale * w_scale)
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)


def gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, rows: torch.Tensor,
         w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
         bias: torch.Tensor | None, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Quantized linear on codes: ``a [M, K]`` int8, ``w [N, 1, K]`` int8 (or ``[N, 1, K/2]`` packed 4-bit) ->
    ``[M, N]`` of ``out_dtype``; ``a_scale``/``a_offset`` are ``[T]`` tables read at each token's row of ``rows``;
    ``residual [M, N]`` is added after dequantization. (The oracle: it sums the codes itself.)"""
    m = a.shape[0]
    wi = weight_integers(w, w_zero).reshape(w.shape[0], -1)
    acc = int_matmul(a, wi.t())
    asum = a.sum(dim=1, dtype=torch.int32) if w_offset is not None else None
    return _epilogue(acc, asum, a.shape[1], sample_values(a_scale, rows, m), sample_values(a_offset, rows, m),
                     w_scale, w_offset, w_sum, bias, residual, out_dtype)


def conv2d(x: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, rows: torch.Tensor,
           w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
           bias: torch.Tensor | None, residual: torch.Tensor | None, kernel_size: tuple[int, int],
           stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
           out_dtype: torch.dtype) -> torch.Tensor:
    """Quantized conv on codes: ``x [B, C, H, W]`` int8 (any memory format), ``w [N, kh*kw, C]`` codes ->
    ``[B, N, Ho, Wo]`` (channels-last memory). Padding holds the code of a real zero (``-a_offset`` of the image's
    row), as the fake-quant model pads its dequantized input with zeros."""
    batch = x.shape[0]
    oa_img = sample_values(a_offset, rows, batch)  # [B]
    pad_code = (-oa_img).round().view(-1, 1, 1, 1)
    kh, kw = kernel_size
    n = w.shape[0]
    wi = weight_integers(w, w_zero).reshape(n, kh, kw, -1).permute(0, 3, 1, 2)  # [N, C, kh, kw]
    ph, pw = padding
    xp = F.pad(x.float(), (pw, pw, ph, ph), value=0.0)
    if ph or pw:  # the padded border holds the zero code of each image's row
        inside = torch.zeros_like(xp, dtype=torch.bool)
        inside[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]] = True
        xp = torch.where(inside, xp, pad_code.float())
    # exact: integer-valued float64 convolution (|sums| < 2^53)
    acc = F.conv2d(xp.double(), wi.double(), stride=stride, dilation=dilation)
    _, _, ho, wo = acc.shape
    acc = acc.permute(0, 2, 3, 1).reshape(-1, n)
    acc = acc.float() if is_fp8(x) else acc.to(torch.int32)
    asum = None
    if w_offset is not None:
        ones = torch.ones(1, x.shape[1], kh, kw, dtype=torch.float64, device=x.device)
        asum = F.conv2d(xp.double(), ones, stride=stride, dilation=dilation).reshape(-1).to(torch.int32)
    res = None if residual is None else residual.permute(0, 2, 3, 1).reshape(-1, n)
    pixels = batch * ho * wo
    y = _epilogue(acc, asum, wi[0].numel(), sample_values(a_scale, rows, pixels), sample_values(a_offset, rows, pixels),
                  w_scale, w_offset, w_sum, bias, res, out_dtype)
    return y.view(batch, ho, wo, n).permute(0, 3, 1, 2)


def attention_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                 rows: torch.Tensor, sm_scale: float, out_dtype: torch.dtype,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit ``q kᵀ`` attention: codes ``q [B, Lq, H, D]``, ``k [B, Lk, H, D]`` (int8, symmetric grids; k already
    centred), ``v [B, Lk, H, D]`` floating point -> ``[B, Lq, H, D]``. ``q_scale``/``k_scale`` are ``[T]`` tables read
    at each sample's row; ``P = softmax(sm_scale sq sk (q kᵀ) + mask)`` in fp32, then ``P v`` in fp32 (the Triton
    kernel runs ``P v`` in ``v``'s dtype). ``mask`` (optional) is additive, broadcastable to ``[B, H, Lq, Lk]``."""
    batch = q.shape[0]
    scale = (sample_values(q_scale, rows, batch) * sample_values(k_scale, rows, batch) * sm_scale).view(-1, 1, 1, 1)
    dots = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()).float()  # exact integers
    scores = dots * scale.float()
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(out_dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              rows: torch.Tensor, sm_scale: float, p_max: int, out_dtype: torch.dtype,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit attention of the "qkvp" format on codes ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` (int8) ->
    ``[B, Lq, H, D]``.

    ``scales``/``offsets`` are ``[T, 4]`` tables (q, k, v, probabilities) read at each sample's row. Computes
    ``P = softmax(sm_scale * (sq (q + oq)) (sk (k + ok))^T + mask)`` in fp32, quantizes ``P`` on the probability
    grid (``round(P / sp)`` clamped to ``[0, p_max]``, zero point 0) and returns ``(sp P_q) @ (sv (v + ov))``: the
    fake-quant attention of ``nn/attention.py``. ``mask`` (optional) is additive, broadcastable to
    ``[B, H, Lq, Lk]``."""
    batch = q.shape[0]
    per_sample = [(t[rows].repeat_interleave(batch // rows.numel(), dim=0)).float().view(batch, 4, 1, 1, 1)
                  for t in (scales, offsets)]
    s, o = (t.unbind(1) for t in per_sample)
    qf = (q.float() + o[0]) * s[0]
    kf = (k.float() + o[1]) * s[1]
    vf = (v.float() + o[2]) * s[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * sm_scale
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    probs = torch.clamp(torch.round(probs / s[3]), 0, p_max) * s[3]
    return torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(out_dtype)
