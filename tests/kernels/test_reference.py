"""``kernels/reference.py`` against the fake-quant math it replaces (float64 on dequantized values)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from questdiff.kernels import reference as R
from questdiff.primitives import fake_quantize, qrange


def _tables(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.rand(rows) * 0.1 + 0.01, torch.randint(-20, 20, (rows,)).float(), torch.tensor([1])


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (6, True)])
def test_quantize_codes_are_the_fake_quantizer_integers(bits, symmetric):
    qmin, qmax = qrange(bits, symmetric)
    o = R.code_offset(qmin, qmax)
    x = torch.randn(4, 7, 9) * 3
    scale, zero = torch.tensor(0.02), torch.tensor(0.0 if symmetric else float((qmax + 1) // 2 - 3))
    codes = R.quantize_codes(x, scale, zero - o, qmin - o, qmax - o)
    assert codes.dtype == torch.int8
    assert torch.equal((codes.float() + o - zero) * scale, fake_quantize(x, scale, zero, qmin, qmax))


def test_code_offset_fits_int8():
    assert R.code_offset(0, 255) == 128 and R.code_offset(-128, 127) == 0 and R.code_offset(0, 15) == 0
    with pytest.raises(ValueError, match="does not fit"):
        R.code_offset(0, 511)


def test_int4_packing_round_trip():
    nibbles = torch.randint(0, 16, (5, 3, 8))
    zero = torch.randint(0, 16, (5,))
    packed = R.pack_int4(nibbles)
    assert packed.shape == (5, 3, 4) and packed.dtype == torch.uint8
    assert torch.equal(R.unpack_int4(packed, zero), (nibbles - zero.view(-1, 1, 1)).to(torch.int8))
    with pytest.raises(ValueError, match="even"):
        R.pack_int4(torch.zeros(2, 1, 3, dtype=torch.long))


def _weights(n: int, taps: int, c: int, w4: bool, offsets: bool):
    if w4:
        w = R.pack_int4(torch.randint(0, 16, (n, taps, c)))
        zero, offset = torch.randint(0, 16, (n,)).to(torch.int16), None
    else:
        w, zero = torch.randint(-128, 128, (n, taps, c), dtype=torch.int8), None
        offset = torch.randint(-5, 6, (n,)).float() if offsets else None
    integers = R.weight_integers(w, zero).double()
    real = (integers + (0 if offset is None else offset.double().view(-1, 1, 1)))
    return w, zero, offset, R.weight_integers(w, zero).flatten(1).sum(1).float(), real


@pytest.mark.parametrize("w4,offsets", [(False, True), (False, False), (True, False)])
def test_gemm_is_the_dequantized_matmul(w4, offsets):
    m, n, k = 19, 11, 24
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    a_scale, a_offset, row = _tables()
    w, zero, offset, w_sum, real = _weights(n, 1, k, w4, offsets)
    w_scale, bias, residual = torch.rand(n) * 0.01, torch.randn(n), torch.randn(m, n)
    y = R.gemm(a, w, a_scale, a_offset, row, w_scale, offset, w_sum, zero, bias, residual, torch.float32)
    x_real = (a.double() + a_offset[row].double()[:, None]) * a_scale[row].double()[:, None]
    expected = x_real @ (real[:, 0] * w_scale.double()[:, None]).T + bias.double() + residual.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 2), (1, 1), (1, 1)),
                                                     ((1, 1), (0, 0), (1, 1)), ((1, 2), (2, 1), (2, 1))])
@pytest.mark.parametrize("w4", [False, True])
def test_conv2d_is_the_dequantized_convolution_with_zero_padding(stride, padding, dilation, w4):
    b, c, h, wd, n = 2, 6, 7, 5, 4
    x = torch.randint(-128, 128, (b, c, h, wd), dtype=torch.int8)
    a_scale, a_offset, row = _tables()
    w, zero, offset, w_sum, real = _weights(n, 9, c, w4, offsets=True)
    w_scale, bias = torch.rand(n) * 0.01, torch.randn(n)
    y = R.conv2d(x, w, a_scale, a_offset, row, w_scale, offset, w_sum, zero, bias, None, (3, 3), stride, padding,
                 dilation, torch.float32)
    x_real = (x.double() + a_offset[row].double()) * a_scale[row].double()
    w_real = (real * w_scale.double().view(-1, 1, 1)).reshape(n, 3, 3, c).permute(0, 3, 1, 2)
    expected = F.conv2d(x_real, w_real, bias.double(), stride, padding, dilation)  # zero padding of the real input
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_per_sample_rows_give_each_sample_its_own_grid():
    a_scale, a_offset, _ = _tables()
    rows = torch.tensor([2, 0])
    assert torch.equal(R.sample_values(a_scale, rows, 6), a_scale[[2, 2, 2, 0, 0, 0]])
    with pytest.raises(ValueError, match="cannot be split"):
        R.sample_values(a_scale, rows, 5)
    x = torch.randn(4, 3) * 3
    codes, sums = R.quantize_tokens(x, a_scale, a_offset, rows, -128, 127)
    assert torch.equal(codes[:2], R.quantize_codes(x[:2], a_scale[2], a_offset[2], -128, 127))
    assert torch.equal(codes[2:], R.quantize_codes(x[2:], a_scale[0], a_offset[0], -128, 127))
    assert torch.equal(sums, codes.sum(1, dtype=torch.int32))


def test_attention_qk_is_softmax_of_the_dequantized_scores_times_v():
    b, lq, lk, h, d = 2, 5, 7, 2, 4
    q, k = (torch.randint(-127, 128, (b, length, h, d), dtype=torch.int8) for length in (lq, lk))
    v = torch.randn(b, lk, h, d)
    q_scale, k_scale = torch.rand(3) * 0.02 + 0.01, torch.rand(3) * 0.02 + 0.01
    rows = torch.tensor([2, 0])
    out = R.attention_qk(q, k, v, q_scale, k_scale, rows, d**-0.5, torch.float64)
    for i, r in enumerate(rows.tolist()):
        qf, kf = q[i].double() * q_scale[r].double(), k[i].double() * k_scale[r].double()
        probs = (torch.einsum("qhd,khd->hqk", qf, kf) * d**-0.5).softmax(-1)
        torch.testing.assert_close(out[i], torch.einsum("hqk,khd->qhd", probs, v[i].double()), rtol=1e-5, atol=1e-6)


def test_attention_quantizes_probabilities_on_the_fixed_grid():
    b, lq, lk, h, d = 2, 5, 7, 2, 4
    q, k, v = (torch.randint(-128, 128, (b, length, h, d), dtype=torch.int8) for length in (lq, lk, lk))
    scales = torch.rand(3, 4) * 0.02 + 0.01
    scales[:, 3] = 1 / 255
    offsets = torch.randint(-5, 5, (3, 4)).float()
    row = torch.tensor([2])
    out = R.attention(q, k, v, scales, offsets, row, d**-0.5, 255, torch.float64)
    s, o = scales[2].double(), offsets[2].double()
    qf, kf, vf = ((t.double() + o[i]) * s[i] for i, t in enumerate((q, k, v)))
    probs = (torch.einsum("bqhd,bkhd->bhqk", qf, kf) * d**-0.5).softmax(-1)
    probs = fake_quantize(probs, s[3], torch.tensor(0.0, dtype=torch.float64), 0, 255)
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", probs, vf), rtol=1e-4, atol=1e-5)


def test_int_matmul_is_exact_for_one_input_channel():
    """A Linear(1, N) gives a [1, N] weight view whose size-1 dim keeps a stride of 1: still the exact product."""
    a = torch.randint(-128, 128, (3, 1), dtype=torch.int8)
    w = torch.randint(-128, 128, (16, 1), dtype=torch.int8)
    assert torch.equal(R.int_matmul(a, w.t()), (a.long() @ w.long().t()).int())


def test_conv2d_op_with_dilation_agrees_with_its_fake_registration():
    """The custom op's shape function (torch.compile's view of it) takes dilation into account."""
    from questdiff.kernels import ops

    x = torch.randint(-128, 128, (2, 6, 9, 8), dtype=torch.int8)
    a_scale, a_offset, row = _tables()
    w, zero, offset, w_sum, _ = _weights(4, 9, 6, False, offsets=True)
    a_sum = x.sum(1, dtype=torch.int32).reshape(-1)
    for channels_last in (True, False):
        args = (x, w, a_scale, a_offset, row, torch.rand(4) * 0.01, offset, w_sum, zero, a_sum, None, None, [3, 3],
                [2, 1], [1, 2], [2, 3], torch.float32, channels_last, False)
        torch.library.opcheck(ops.conv2d, args, test_utils=("test_schema", "test_faketensor"))
        out = ops.conv2d(*args)
        assert out.shape == (2, 4, 4, 6) and out.is_contiguous(memory_format=torch.channels_last) == channels_last
