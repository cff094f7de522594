"""The Triton kernels against ``kernels/reference.py``: compiled on a GPU, and under ``TRITON_INTERPRET=1`` on the
CPU (CI), with fresh random codes, odd sizes, per-sample timestep rows and every operand variant. Integer GEMMs must
match exactly up to fp32 rounding of the epilogue."""
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


def _tables(device, rows=(1,), count=3):
    """``[count]`` scale and offset tables and the rows ``[R]`` that read them."""
    return (torch.rand(count, device=device) * 0.1 + 0.01, torch.randint(-20, 20, (count,), device=device).float(),
            torch.tensor(rows, device=device))


def _weights(n, taps, c, w4, device):
    if w4:
        w = R.pack_int4(torch.randint(0, 16, (n, taps, c), device=device))
        zero, offset = torch.randint(0, 16, (n,), device=device).to(torch.int16), None
    else:
        w = torch.randint(-128, 128, (n, taps, c), dtype=torch.int8, device=device)
        zero, offset = None, torch.randint(-5, 6, (n,), device=device).float()
    return w, zero, offset, R.weight_integers(w, zero).flatten(1).sum(1).float()


@pytest.mark.parametrize("rows", [(1,), (2, 0)], ids=["one-row", "per-sample"])
def test_quantize_writes_codes_channels_last_and_their_sums(kernels, rows):
    quant, _, _, device = kernels
    scale, shift, rows = _tables(device, rows)
    for lo, hi in ((-128, 127), (0, 15)):
        x = torch.randn(2, 5, 37, device=device) * 4
        codes, sums = quant.quantize(x, scale, shift, rows, lo, hi, channels_first=False, sums=True)
        ref, ref_sums = R.quantize_tokens(x.reshape(-1, 37), scale, shift, rows, lo, hi)
        assert torch.equal(codes.reshape(-1, 37), ref) and torch.equal(sums, ref_sums)
    for memory in (torch.contiguous_format, torch.channels_last):  # a conv input, in both memory formats
        x = torch.randn(2, 6, 4, 3, device=device).contiguous(memory_format=memory) * 4
        codes, sums = quant.quantize(x, scale, shift, rows, -128, 127, channels_first=True, sums=False)
        assert codes.is_contiguous(memory_format=torch.channels_last) and sums.numel() == 0
        ref, _ = R.quantize_tokens(x.permute(0, 2, 3, 1).reshape(-1, 6), scale, shift, rows, -128, 127)
        assert torch.equal(codes.permute(0, 2, 3, 1).reshape(-1, 6), ref)


@pytest.fixture(params=["pointers", "tma"])
def tiles(request, kernels, monkeypatch):
    """The linear kernel's two ways of loading tiles (TMA descriptors run in the interpreter too)."""
    _, gemm, _, device = kernels
    if request.param == "tma" and device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper-class GPU")
    monkeypatch.setenv("QUESTDIFF_TMA", "1" if request.param == "tma" else "0")
    gemm.tma_available.cache_clear()
    yield request.param
    gemm.tma_available.cache_clear()


@pytest.mark.parametrize("w4,offsets,residual", [(False, True, True), (False, False, False), (True, False, True)])
def test_gemm(kernels, tiles, w4, offsets, residual):
    _, gemm, _, device = kernels
    m, n, k = (38, 45, 96) if device == "cpu" else (334, 257, 640)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    a_scale, a_offset, rows = _tables(device, (2, 0))  # two samples of 19 (167) tokens, each its own row
    w, zero, offset, w_sum = _weights(n, 1, k, w4, device)
    offset = offset if offsets else None
    a_sum = a.sum(1, dtype=torch.int32)
    args = (a, w, a_scale, a_offset, rows, torch.rand(n, device=device) * 0.01, offset, w_sum, zero)
    tail = (torch.randn(n, device=device), torch.randn(m, n, device=device) if residual else None, torch.float32)
    torch.testing.assert_close(gemm.gemm(*args, a_sum, *tail), R.gemm(*args, *tail), rtol=1e-5, atol=1e-5)


def test_gemm_needs_the_code_sums_for_weight_offsets(kernels):
    _, gemm, _, device = kernels
    a = torch.zeros(4, 32, dtype=torch.int8, device=device)
    w, zero, offset, w_sum = _weights(8, 1, 32, False, device)
    a_scale, a_offset, rows = _tables(device)
    with pytest.raises(ValueError, match="code sums"):
        gemm.gemm(a, w, a_scale, a_offset, rows, torch.ones(8, device=device), offset, w_sum, zero, None, None, None,
                  torch.float32)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 0, 1),
                                                            (3, 1, 2, 2)])
@pytest.mark.parametrize("w4", [False, True])
def test_conv2d(kernels, kernel, stride, padding, dilation, w4):
    quant, gemm, _, device = kernels
    b, c, h, wd, n = (2, 24, 7, 6, 20) if device == "cpu" else (4, 96, 17, 13, 72)
    x = torch.randint(-128, 128, (b, c, h, wd), dtype=torch.int8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    a_scale, a_offset, rows = _tables(device, (2, 0))  # per-sample rows: each image pads with its own zero code
    w, zero, offset, w_sum = _weights(n, kernel * kernel, c, w4, device)
    a_sum = x.permute(0, 2, 3, 1).sum(-1, dtype=torch.int32).reshape(-1)
    ho = (h + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    head = (w, a_scale, a_offset, rows, torch.rand(n, device=device) * 0.01, offset, w_sum, zero)
    tail = (torch.randn(n, device=device), torch.randn(b, n, ho, wo, device=device), (kernel, kernel),
            (stride, stride), (padding, padding), (dilation, dilation), torch.float32)
    out = gemm.conv2d(x, *head, a_sum, *tail)
    torch.testing.assert_close(out, R.conv2d(x, *head, *tail), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # an NCHW input (copied to channels-last first) computes the same; so does an NCHW output (the model's layout)
    torch.testing.assert_close(gemm.conv2d(x.contiguous(), *head, a_sum, *tail), out, rtol=0, atol=0)
    nchw = gemm.conv2d(x, *head, a_sum, *tail, channels_last=False)
    assert nchw.is_contiguous()
    torch.testing.assert_close(nchw, out, rtol=0, atol=0)


@pytest.mark.parametrize("lq,lk,d", [(45, 37, 40), (16, 77, 8), (33, 64, 64)])
def test_attention_qk(kernels, lq, lk, d):
    _, _, attention, device = kernels
    b, h = 4, 2
    q, k = (torch.randint(-127, 128, (b, length, h, d), dtype=torch.int8, device=device) for length in (lq, lk))
    v = torch.randn(b, lk, h, d, device=device)
    q_scale, k_scale = (torch.rand(3, device=device) * 0.01 + 0.005 for _ in range(2))
    rows = torch.tensor([1, 2], device=device)  # samples 0-1 read row 1, samples 2-3 row 2
    args = (q, k, v, q_scale, k_scale, rows, d**-0.5, torch.float32)
    out, ref = attention.attention_qk(*args), R.attention_qk(*args)
    # on a GPU P v runs in tf32 for fp32 values; the interpreter computes in fp32
    tol = 2e-3 if device == "cuda" else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("lq,lk,d", [(45, 37, 40), (16, 77, 8)])
def test_attention_qkvp(kernels, lq, lk, d):
    _, _, attention, device = kernels
    b, h = 2, 2
    q, k, v = (torch.randint(-128, 128, (b, length, h, d), dtype=torch.int8, device=device) for length in (lq, lk, lk))
    scales = torch.rand(3, 4, device=device) * 0.01 + 0.005
    scales[:, 3] = 1 / 255
    offsets = torch.randint(-10, 10, (3, 4), device=device).float()
    rows = torch.tensor([1, 2], device=device)
    args = (q, k, v, scales, offsets, rows, d**-0.5, 255, torch.float32)
    out, ref = attention.attention(*args), R.attention(*args)
    # exp/softmax order differ: a probability on a rounding boundary may land one step away (sp * |v|)
    flips = ((out - ref).abs() > 1e-4).float().mean()
    assert flips < 0.01
    torch.testing.assert_close(out.median(), ref.median(), rtol=1e-3, atol=1e-4)
    assert (out - ref).abs().max() <= 2 * float(scales[1:, 3].max() * scales[1:, 2].max() * 300)


def _fp8_codes(*shape, device):
    return (torch.randn(*shape, device=device) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)


def test_gemm_on_fp8_codes(kernels, tiles):
    """FP8 (e4m3) codes run the same GEMM with fp32 accumulation: symmetric grids, zero offset tables."""
    _, gemm, _, device = kernels
    m, n, k = (38, 45, 96) if device == "cpu" else (334, 257, 640)
    a, w = _fp8_codes(m, k, device=device), _fp8_codes(n, 1, k, device=device)
    scale, rows = torch.rand(3, device=device) * 0.01 + 0.001, torch.tensor([2, 0], device=device)
    zeros = torch.zeros(3, device=device)
    args = (a, w, scale, zeros, rows, torch.rand(n, device=device) * 0.01, None, torch.zeros(n, device=device), None)
    tail = (torch.randn(n, device=device), torch.randn(m, n, device=device), torch.float32)
    torch.testing.assert_close(gemm.gemm(*args, None, *tail), R.gemm(*args, *tail), rtol=1e-5, atol=1e-5)


def test_conv2d_on_fp8_codes(kernels):
    _, gemm, _, device = kernels
    b, c, h, wd, n = (2, 24, 7, 6, 20) if device == "cpu" else (4, 96, 17, 13, 72)
    x = _fp8_codes(b, h, wd, c, device=device).permute(0, 3, 1, 2)  # channels-last codes
    w = _fp8_codes(n, 9, c, device=device)
    scale, rows = torch.rand(3, device=device) * 0.01 + 0.001, torch.tensor([2, 0], device=device)
    head = (w, scale, torch.zeros(3, device=device), rows, torch.rand(n, device=device) * 0.01, None,
            torch.zeros(n, device=device), None)
    tail = (torch.randn(n, device=device), None, (3, 3), (1, 1), (1, 1), (1, 1), torch.float32)
    torch.testing.assert_close(gemm.conv2d(x, *head, None, *tail), R.conv2d(x, *head, *tail), rtol=1e-5, atol=1e-4)
