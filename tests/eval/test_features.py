from __future__ import annotations

import pytest
import torch

from questdiff.eval.features import extract_features, feature_label, validate_images


def test_feature_label_names_the_network() -> None:
    assert feature_label("fmnist-features") == "FMNIST features"
    assert feature_label("mnist-features") == "MNIST features"
    with pytest.raises(ValueError, match="-features"):
        feature_label("inception")


def test_uint8_images_are_scaled_to_unit_range() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat(512).reshape(1, 1, 32, 32)
    out = validate_images(x)
    assert out.dtype == torch.float32 and out.min() == 0 and out.max() == 1


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(4, 32, 32), r"\[N, 1, 32, 32\].*unsqueeze\(1\)"),
        (torch.rand(4, 3, 32, 32), r"got shape \(4, 3, 32, 32\)"),
        (torch.rand(4, 1, 28, 28), r"pad/resize to 32x32"),
        (torch.rand(4, 1, 32, 32) * 2 - 1, r"\(x \+ 1\) / 2"),
        (torch.rand(4, 1, 32, 32) * 255, r"divide by 255"),
        (torch.full((4, 1, 32, 32), float("nan")), r"NaN"),
        (torch.zeros(4, 1, 32, 32, dtype=torch.int64), r"x.float\(\) / 255"),
        (torch.zeros(0, 1, 32, 32), r"empty"),
    ],
)
def test_bad_images_raise_a_clear_error(images: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_images(images)


def test_rounding_overshoot_is_clamped_not_rejected() -> None:
    x = torch.full((1, 1, 32, 32), 1.0 + 1e-6)
    assert validate_images(x).max() == 1.0


def test_features_have_the_documented_shapes_and_ignore_batching(feature_net, images) -> None:
    a = extract_features(feature_net, images[:40], "fmnist-features", batch_size=7)
    b = extract_features(feature_net, images[:40], "fmnist-features", batch_size=40)
    assert a.label == "FMNIST features" and len(a) == 40
    assert a.pool.shape == (40, 256) and a.spatial.shape == (40, 2048) and a.logits.shape == (40, 10)
    for key in ("pool", "spatial", "logits"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-4, atol=1e-5)
