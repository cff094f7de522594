"""The Triton kernels against ``kernels/reference.py``: compiled on a GPU, and under ``TRITON_INTERPRET=1`` on the
CPU (CI), with fresh random codes, odd sizes and every operand variant. Integer GEMMs must match exactly up to
fp32 rounding of the epilogue."""
from __future__ import annotations

import os

import pytest
import torch

from questdiff.kernels import reference as R

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels():
    """(quant, gemm, attention) modules and the device they run on: the GPU, else Triton's interpreter on the CPU
    (tests/conftest.py turns it on before triton is imported)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from questdiff.kernels import triton_attention, triton_gemm, triton_quant

    return triton_quant, triton_gemm, triton_attention, "cuda" if torch.cuda.is_available() else "cpu"


def _tables(device, rows=3):
    return (torch.rand(rows, device=device) * 0.1 + 0.01, torch.randint(-20, 20, (rows,), device=device).float(),
            torch.tensor(1, device=device))


def _weights(n, taps, c, w4, device):
    if w4:
        w = R.pack_int4(torch.randint(0, 16, (n, taps, c), device=device))
        zero, offset = torch.randint(0, 16, (n,), device=device).to(torch.int16), None
    else:
        w = torch.randint(-128, 128, (n, taps, c), dtype=torch.int8, device=device)
        zero, offset = None, torch.randint(-5, 6, (n,), device=device).float()
    return w, zero, offset, R.weight_integers(w, zero).flatten(1).sum(1).float()


def test_quantize_codes(kernels):
    quant, _, _, device = kernels
    x = torch.randn(3, 5, 37, device=device) * 4
    scale, shift, row = _tables(device)
    for lo, hi in ((-128, 127), (0, 15)):
        assert torch.equal(quant.quantize_codes(x, scale, shift, row, lo, hi),
                           R.quantize_codes(x, scale[row], shift[row], lo, hi))
    cl = torch.randn(2, 6, 4, 3, device=device).contiguous(memory_format=torch.channels_last)
    out = quant.quantize_codes(cl, scale, shift, row, -128, 127)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, R.quantize_codes(cl, scale[row], shift[row], -128, 127))


@pytest.mark.parametrize("w4,offsets,residual", [(False, True, True), (False, False, False), (True, False, True)])
def test_gemm(kernels, w4, offsets, residual):
    _, gemm, _, device = kernels
    m, n, k = (37, 45, 96) if device == "cpu" else (333, 257, 640)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    a_scale, a_offset, row = _tables(device)
    w, zero, offset, w_sum = _weights(n, 1, k, w4, device)
    offset = offset if offsets else None
    args = (a, w, a_scale, a_offset, row, torch.rand(n, device=device) * 0.01, offset, w_sum, zero,
            torch.randn(n, device=device), torch.randn(m, n, device=device) if residual else None, torch.float32)
    torch.testing.assert_close(gemm.gemm(*args), R.gemm(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0)])
@pytest.mark.parametrize("w4", [False, True])
def test_conv2d(kernels, kernel, stride, padding, w4):
    _, gemm, _, device = kernels
    b, c, h, wd, n = (2, 24, 7, 6, 20) if device == "cpu" else (3, 96, 17, 13, 72)
    x = torch.randint(-128, 128, (b, c, h, wd), dtype=torch.int8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    a_scale, a_offset, row = _tables(device)
    w, zero, offset, w_sum = _weights(n, kernel * kernel, c, w4, device)
    ho, wo = (h + 2 * padding - kernel) // stride + 1, (wd + 2 * padding - kernel) // stride + 1
    args = (x, w, a_scale, a_offset, row, torch.rand(n, device=device) * 0.01, offset, w_sum, zero,
            torch.randn(n, device=device), torch.randn(b, n, ho, wo, device=device), (kernel, kernel),
            (stride, stride), (padding, padding), torch.float32)
    out = gemm.conv2d(*args)
    torch.testing.assert_close(out, R.conv2d(*args), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # a non-channels-last input (strided channel loads) computes the same
    torch.testing.assert_close(gemm.conv2d(x.contiguous(), *args[1:]), out, rtol=0, atol=0)


@pytest.mark.parametrize("lq,lk,d", [(45, 37, 40), (16, 77, 8)])
def test_attention(kernels, lq, lk, d):
    _, _, attention, device = kernels
    b, h = 2, 2
    q, k, v = (torch.randint(-128, 128, (b, length, h, d), dtype=torch.int8, device=device) for length in (lq, lk, lk))
    scales = torch.rand(3, 4, device=device) * 0.01 + 0.005
    scales[:, 3] = 1 / 255
    offsets = torch.randint(-10, 10, (3, 4), device=device).float()
    row = torch.tensor(1, device=device)
    args = (q, k, v, scales, offsets, row, d**-0.5, 255, torch.float32)
    out, ref = attention.attention(*args), R.attention(*args)
    # exp/softmax order differ: a probability on a rounding boundary may land one step away (sp * |v|)
    flips = ((out - ref).abs() > 1e-4).float().mean()
    assert flips < 0.01
    torch.testing.assert_close(out.median(), ref.median(), rtol=1e-3, atol=1e-4)
    assert (out - ref).abs().max() <= 2 * float(scales[1, 3] * scales[1, 2] * 300)
