"""The FP8 (e4m3) grid: codes as torch casts them, saturation, straight-through gradients, scale searches."""
import torch

from questdiff.fp8 import (FP8_DTYPE, FP8_MAX, fake_quantize_fp8, fp8_codes, search_fp8_lp_shrink, search_fp8_minmax,
                           search_fp8_percentile)


def test_codes_are_the_saturated_e4m3_cast_computed_in_fp32():
    x = torch.tensor([0.0, 1.0, -3.3, 500.0, -1e4, 1e-4]).to(torch.bfloat16)
    codes = fp8_codes(x, torch.tensor(0.5))
    assert codes.dtype == FP8_DTYPE
    expected = (x.float() / 0.5).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert torch.equal(codes.float(), expected.float())
    assert codes.float().abs().max() == FP8_MAX  # saturates instead of overflowing to NaN


def test_fake_quantize_lands_on_the_grid_with_straight_through_gradients():
    scale = torch.tensor(0.01, requires_grad=True)
    x = torch.tensor([0.3, -1.234, 2.0, 10.0], requires_grad=True)  # 10.0 / 0.01 = 1000 saturates at 448
    y = fake_quantize_fp8(x, scale)
    assert torch.equal(y.detach(), fp8_codes(x.detach(), scale.detach()).float() * 0.01)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))  # identity inside, zero where it saturates
    assert scale.grad is not None and scale.grad != 0
    assert fake_quantize_fp8(x.detach().to(torch.bfloat16), scale.detach()).dtype == torch.bfloat16


def test_searches_pick_scales_no_worse_than_min_max():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1) + torch.randn(16, 64).pow(9) * 0.01  # a few outliers per row
    minmax, lp = search_fp8_minmax(w, axis=0), search_fp8_lp_shrink(w, axis=0)
    assert minmax.shape == lp.shape == (16, 1)
    err = lambda s: (w - fake_quantize_fp8(w, s)).abs().pow(2.4).mean(1)  # noqa: E731
    assert torch.all(err(lp) <= err(minmax) + 1e-12) and torch.any(lp < minmax)
    x = torch.randn(4096) * 2
    x[0] = 200.0
    pct = search_fp8_percentile(x)  # e4m3's relative steps barely care about the range: the outlier may stay
    assert pct.numel() == 1 and x.abs().quantile(0.999) / FP8_MAX <= pct <= search_fp8_minmax(x)
