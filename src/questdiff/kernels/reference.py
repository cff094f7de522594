"""Pure-torch twins of the low-bit kernels: the oracle of their tests and the CPU backend.

Conventions shared with the Triton kernels (``kernels/triton_*.py``):

- **Codes.** A quantized tensor is stored as int8 *codes* ``c = q - o`` where ``q`` is the integer of the fake-quant
  grid and ``o`` an offset that makes it fit int8 (128 for an unsigned 8-bit grid ``[0, 255]``, 0 otherwise). The
  real value is ``scale * (c + offset)`` with ``offset = o - zero_point``: every fake-quant value is reproduced
  exactly, and an integer matmul over codes is exact in int32.
- **Timestep rows.** Static activation scales live in ``[T]`` tables indexed by the active row, a 0-d int64 tensor
  on the device (no host sync, CUDA-graph safe).
- **Weights** are ``[N, taps, C]`` (a linear layer has one tap; a conv has ``kh * kw`` taps, channels last). 8-bit
  codes are int8; 4-bit codes are unsigned nibbles ``q - qmin`` packed two per byte, ``[N, taps, C / 2]`` uint8, the
  low nibble holding channel ``j`` and the high nibble channel ``j + C / 2`` of the same tap (so a kernel unpacks
  two contiguous K-halves without shuffles); their zero points (``zero_point - qmin``) are subtracted before the
  matmul, so 4-bit weights need no offset term.

The GEMM computes, for activations ``a [M, K]`` and weights ``w [N, K]`` (codes)::

    y[m, n] = sa * sw[n] * (sum_k a[m,k] w[n,k] + oa * wsum[n] + ow[n] * asum[m] + K * oa * ow[n]) + bias[n]

with ``sa, oa`` the activation scale/offset of the active row, ``sw, ow`` the per-output-channel weight scale/offset,
``wsum[n] = sum_k w[n, k]`` and ``asum[m] = sum_k a[m, k]``; this is ``(sa (a + oa)) @ (sw (w + ow))^T``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] @ b [K, N]`` of int8 codes -> int32 (``torch._int_mm`` where it applies, else float64)."""
    if a.device.type == "cpu" or (a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0):
        try:
            return torch._int_mm(a.contiguous(), b.contiguous())
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


def _epilogue(acc: torch.Tensor, asum: torch.Tensor | None, k: int, a_scale: torch.Tensor, a_offset: torch.Tensor,
              w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, bias: torch.Tensor | None,
              residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize an int32 accumulator ``[M, N]`` (see the module docstring)."""
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


def gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, row: torch.Tensor,
         w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
         bias: torch.Tensor | None, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Quantized linear on codes: ``a [M, K]`` int8, ``w [N, 1, K]`` int8 (or ``[N, 1, K/2]`` packed 4-bit) ->
    ``[M, N]`` of ``out_dtype``; ``a_scale``/``a_offset`` are ``[T]`` tables read at ``row``; ``residual [M, N]``
    is added after dequantization."""
    wi = weight_integers(w, w_zero).reshape(w.shape[0], -1)
    acc = int_matmul(a, wi.t())
    asum = a.sum(dim=1, dtype=torch.int32) if w_offset is not None else None
    return _epilogue(acc, asum, a.shape[1], a_scale[row], a_offset[row], w_scale, w_offset, w_sum, bias, residual,
                     out_dtype)


def conv2d(x: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, row: torch.Tensor,
           w_scale: torch.Tensor, w_offset: torch.Tensor | None, w_sum: torch.Tensor, w_zero: torch.Tensor | None,
           bias: torch.Tensor | None, residual: torch.Tensor | None, kernel_size: tuple[int, int],
           stride: tuple[int, int], padding: tuple[int, int], out_dtype: torch.dtype,
           dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Quantized conv on codes: ``x [B, C, H, W]`` int8 (any memory format), ``w [N, kh*kw, C]`` codes ->
    ``[B, N, Ho, Wo]`` (channels-last memory). Padding holds the code of a real zero (``-a_offset``), as the
    fake-quant model pads its dequantized input with zeros; ``dilation`` spaces the kernel taps."""
    oa = a_offset[row]
    pad_code = (-oa).round().to(torch.int8)
    kh, kw = kernel_size
    n = w.shape[0]
    wi = weight_integers(w, w_zero).reshape(n, kh, kw, -1).permute(0, 3, 1, 2)  # [N, C, kh, kw]
    ph, pw = padding
    xp = F.pad(x.float(), (pw, pw, ph, ph), value=0.0)
    if ph or pw:  # the padded border holds the zero code
        inside = torch.zeros_like(xp, dtype=torch.bool)
        inside[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]] = True
        xp = torch.where(inside, xp, pad_code.float())
    # exact: integer-valued float64 convolution (|sums| < 2^53)
    acc = F.conv2d(xp.double(), wi.double(), stride=stride, dilation=dilation)
    batch, _, ho, wo = acc.shape
    acc = acc.permute(0, 2, 3, 1).reshape(-1, n).to(torch.int32)
    asum = None
    if w_offset is not None:
        ones = torch.ones(1, x.shape[1], kh, kw, dtype=torch.float64, device=x.device)
        asum = F.conv2d(xp.double(), ones, stride=stride, dilation=dilation).reshape(-1).to(torch.int32)
    res = None if residual is None else residual.permute(0, 2, 3, 1).reshape(-1, n)
    y = _epilogue(acc, asum, wi[0].numel(), a_scale[row], oa, w_scale, w_offset, w_sum, bias, res, out_dtype)
    return y.view(batch, ho, wo, n).permute(0, 3, 1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              row: torch.Tensor, sm_scale: float, p_max: int, out_dtype: torch.dtype,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit attention on codes ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` (int8) -> ``[B, Lq, H, D]``.

    ``scales``/``offsets`` are ``[T, 4]`` tables (q, k, v, probabilities) read at ``row``. Computes
    ``P = softmax(sm_scale * (sq (q + oq)) (sk (k + ok))^T + mask)`` in fp32, quantizes ``P`` on the probability
    grid (``round(P / sp)`` clamped to ``[0, p_max]``, zero point 0) and returns ``(sp P_q) @ (sv (v + ov))``: the
    fake-quant attention of ``nn/attention.py``. ``mask`` (optional) is additive, broadcastable to
    ``[B, H, Lq, Lk]``."""
    s, o = scales[row].float(), offsets[row].float()
    qf = (q.float() + o[0]) * s[0]
    kf = (k.float() + o[1]) * s[1]
    vf = (v.float() + o[2]) * s[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * sm_scale
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    probs = torch.clamp(torch.round(probs / s[3]), 0, p_max) * s[3]
    return torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(out_dtype)
