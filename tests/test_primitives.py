import pytest
import torch

from questdiff import primitives as P


def test_qrange():
    assert P.qrange(8, False) == (0, 255)
    assert P.qrange(8, True) == (-128, 127)
    assert P.qrange(4, True) == (-8, 7)


@pytest.mark.parametrize("bits", [1, 17, 4.0, True, "8"])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="unsupported"):
        P.qrange(bits, False)


def test_round_ste_gradient_is_identity():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = P.round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_fake_quantize_matches_integer_roundtrip():
    x = torch.randn(64, 7)
    scale, zp = P.search_minmax(x, 8, False, axis=1)
    q = P.quantize(x, scale, zp, 0, 255)
    assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 255
    assert torch.equal(P.dequantize(q, scale, zp), P.fake_quantize(x, scale, zp, 0, 255))


def test_fake_quantize_grad_to_scale_and_clamped_input():
    x = torch.tensor([0.1, 0.5, 10.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    y = P.fake_quantize(x, scale, torch.tensor(0.0), -8, 7)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped value gets no gradient
    assert scale.grad is not None and scale.grad != 0


def test_qparams_range_includes_zero_and_represents_it_exactly():
    xmin, xmax = torch.tensor(0.5), torch.tensor(2.0)
    scale, zp = P.qparams_from_range(xmin, xmax, 8, False)
    assert zp == 0 and torch.isclose(scale, torch.tensor(2.0 / 255))
    # the top of the range is not clipped (official defect §6.9)
    assert torch.isclose(P.fake_quantize(xmax, scale, zp, 0, 255), xmax, atol=1e-6)
    s, z = P.qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), 8, True)
    assert z == 0 and torch.isclose(s, torch.tensor(3.0 / 127))
    s, z = P.qparams_from_range(torch.tensor(0.0), torch.tensor(1.0), 8, False, always_zero=True)
    assert z == 0 and torch.isclose(s, torch.tensor(1.0 / 255))


def test_minmax_per_channel_exact_extremes():
    x = torch.randn(5, 3, 4) * torch.arange(1, 6).view(5, 1, 1)
    scale, zp = P.search_minmax(x, 8, False, axis=0)
    assert scale.shape == (5, 1, 1)
    xq = P.fake_quantize(x, scale, zp, 0, 255)
    assert ((x - xq).abs() <= scale / 2 + 1e-6).all()


def test_lp_shrink_not_worse_than_minmax_and_shrinks_outliers():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[0, 0] = 12.0  # an outlier: the search should clip it
    s_lp, z_lp = P.search_lp_shrink(w, 4, False, axis=0)
    s_mm, z_mm = P.search_minmax(w, 4, False, axis=0)
    err = lambda s, z: (w - P.fake_quantize(w, s, z, 0, 15)).abs().pow(2.4).mean(dim=1)
    assert (err(s_lp, z_lp) <= err(s_mm, z_mm) + 1e-7).all()
    assert s_lp[0] < s_mm[0]


def test_percentile_search_clips_rare_outliers():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 1000.0  # one value in 1e5: clipping it costs less MSE than a 100x coarser step
    s_pct, z_pct = P.search_percentile(x, 8, False)
    s_mm, _ = P.search_minmax(x, 8, False)
    assert s_pct < s_mm / 10
    s_sym, z_sym = P.search_percentile(x, 8, True)
    assert z_sym == 0


def test_percentile_per_channel_and_group_axes():
    x = torch.randn(4, 6, 10)
    s, z = P.search_percentile(x, 4, False, axis=1)
    assert s.shape == (1, 6, 1)
    g = P.to_groups(torch.randn(6, 8, 3, 3), 24)
    assert g.shape == (6, 3, 24)
    s, z = P.search_lp_shrink(g, 4, False, axis=(0, 1))
    assert s.shape == (6, 3, 1)
    with pytest.raises(ValueError, match="does not divide"):
        P.to_groups(torch.randn(6, 8, 3, 3), 7)


def test_round_half_even_equals_torch_round():
    edge = torch.tensor([0.5 - 2**-25, -0.5 + 2**-25, 1.5 - 2**-24, 2.5, -2.5, 3.5, 2**23 - 0.5])
    x = torch.cat([torch.randn(100_000) * 300, torch.arange(-50, 50) + 0.5, edge])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert torch.equal(P.round_half_even(x.to(dtype)), torch.round(x.to(dtype)))


@pytest.mark.parametrize("shape,axis", [((1000,), None), ((7, 300), 0), ((4, 5, 6), (0, 1)), ((1,), None)])
def test_quantile_equals_kthvalue_order_statistic(shape, axis):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.001, 0.3, 0.5, 0.999, 0.99999, 1.0):
        got = P._quantile(x, q, axis)
        rows = x.permute(*P._kept_dims(x, axis), *P._reduce_dims(x, axis)).reshape(got.numel(), -1)
        k = min(max(round(q * (rows.shape[1] - 1)), 0), rows.shape[1] - 1)
        assert torch.equal(got.flatten(), rows.kthvalue(k + 1, dim=1).values), q


def test_quantile_of_rows_above_the_kernel_limit_is_reduced_in_exact_chunks(monkeypatch):
    monkeypatch.setattr(P, "TOPK_CHUNK", 64)  # stands in for CUDA's 2**31 - 1 elements per row
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    for q in (0.001, 0.99, 0.9999):
        k = round(q * 999)
        assert torch.equal(P._quantile(x, q, None).flatten(), x.kthvalue(k + 1).values.flatten())
    with pytest.raises(ValueError, match="per channel"):
        P._quantile(x, 0.5, None)
