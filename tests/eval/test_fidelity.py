from __future__ import annotations

import pytest
import torch
from torchmetrics.image import StructuralSimilarityIndexMeasure

from questdiff.eval.fidelity import feature_distance, fidelity_metrics, psnr, ssim


@pytest.fixture(scope="module")
def pair(images) -> tuple[torch.Tensor, torch.Tensor]:
    ref = images[:16]
    noisy = (ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return noisy, ref


def test_psnr_is_10_log10_of_one_over_the_per_image_mse(pair) -> None:
    noisy, ref = pair
    mse = (noisy - ref).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(psnr(noisy, ref), 10 * torch.log10(1.0 / mse))
    assert torch.isinf(psnr(ref, ref)).all()


def test_ssim_is_torchmetrics_ssim_per_image(pair) -> None:
    noisy, ref = pair
    per_image = ssim(noisy, ref)
    assert per_image.shape == (16,)
    for i in (0, 7):
        metric = StructuralSimilarityIndexMeasure(data_range=1.0)
        metric.update(noisy[i:i + 1], ref[i:i + 1])
        torch.testing.assert_close(per_image[i], metric.compute())
    torch.testing.assert_close(ssim(ref, ref), torch.ones(16))


def test_feature_distance_is_zero_for_identical_images_and_grows_with_noise(feature_net, pair) -> None:
    noisy, ref = pair
    noisier = (ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    torch.testing.assert_close(feature_distance(ref, ref, feature_net), torch.zeros(16, dtype=torch.float64))
    d_small, d_large = feature_distance(noisy, ref, feature_net), feature_distance(noisier, ref, feature_net)
    assert (d_small > 0).all() and (d_large > d_small).all() and (d_large <= 4).all()
    torch.testing.assert_close(feature_distance(ref, noisy, feature_net, batch_size=5), d_small)  # symmetric, batched


def test_fidelity_metrics_averages_per_image_values(feature_net, pair) -> None:
    noisy, ref = pair
    metrics = fidelity_metrics(noisy, ref, feature_net, "fmnist-features")
    assert set(metrics) == {"PSNR (dB)", "SSIM", "feature distance (FMNIST features)"}
    assert metrics["PSNR (dB)"] == pytest.approx(float(psnr(noisy, ref).mean()))
    assert metrics["SSIM"] == pytest.approx(float(ssim(noisy, ref).mean()))


def test_mismatched_sets_raise(feature_net, pair) -> None:
    noisy, ref = pair
    with pytest.raises(ValueError, match="same seeds, in the same order"):
        psnr(noisy[:4], ref)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        ssim(noisy * 2 - 1, ref)
