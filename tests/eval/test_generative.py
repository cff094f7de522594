from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import torch

from questdiff.eval.features import FeatureSet, extract_features
from questdiff.eval.generative import (
    MEANINGFUL_SAMPLES,
    RECOMMENDED_SAMPLES,
    frechet_distance,
    generative_metrics,
    inception_score,
    kernel_distance,
    small_sample_warning,
)


@pytest.fixture(scope="module")
def sets(feature_net, images, make_images) -> dict[str, FeatureSet]:
    noise = torch.rand(256, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    return {
        "a": extract_features(feature_net, images, "fmnist-features"),
        "b": extract_features(feature_net, make_images(256, 7), "fmnist-features"),
        "noise": extract_features(feature_net, noise, "fmnist-features"),
    }


def _fid_by_hand(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().numpy(), y.double().numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_the_closed_form(sets) -> None:
    expected = _fid_by_hand(sets["b"].pool, sets["a"].pool)
    assert frechet_distance(sets["b"], sets["a"]) == pytest.approx(expected, rel=1e-6)


def test_fid_and_sfid_are_zero_for_a_set_against_itself_and_large_against_noise(sets) -> None:
    for key in ("pool", "spatial"):
        scale = frechet_distance(sets["noise"], sets["a"], key)
        assert abs(frechet_distance(sets["a"], sets["a"], key)) < 1e-3 * scale
    assert frechet_distance(sets["noise"], sets["a"]) > 10 * frechet_distance(sets["b"], sets["a"]) > 0


def test_kid_is_zero_against_itself_positive_against_noise_and_seeded(sets) -> None:
    scale, _ = kernel_distance(sets["noise"], sets["a"], subsets=10, subset_size=100)
    same, _ = kernel_distance(sets["a"], sets["a"], subsets=10, subset_size=100)
    assert abs(same) < 1e-3 * scale and scale > 0
    kid = kernel_distance(sets["b"], sets["a"], 10, 100, seed=3)
    assert kid == kernel_distance(sets["b"], sets["a"], 10, 100, seed=3)


def test_inception_score_counts_the_classes_it_sees() -> None:
    def logits(classes: torch.Tensor) -> FeatureSet:
        n = len(classes)
        return FeatureSet(torch.zeros(n, 256), torch.zeros(n, 2048), 50.0 * torch.eye(10)[classes], "FMNIST features")

    balanced, _ = inception_score(logits(torch.arange(1000) % 10))
    two_classes, _ = inception_score(logits(torch.arange(1000) % 2))
    one_class, std = inception_score(logits(torch.zeros(1000, dtype=torch.long)))
    # IS = exp(H(p(y))) for confident predictions: the number of classes, less the imbalance of random splits
    assert 9.5 < balanced <= 10.0
    assert 1.95 < two_classes <= 2.0
    assert one_class == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-6)


def test_too_few_samples_for_is_are_warned_about() -> None:
    """Issue 20 item 6: a perfect 10-class generator scores IS 10; from 10 samples (splits of one) it scores exactly
    1.0 and from 100 about 6.6: below ``MEANINGFUL_SAMPLES`` the numbers say little, and the warning says so."""
    def balanced(n: int) -> float:
        classes = torch.arange(n) % 10
        return inception_score(FeatureSet(torch.zeros(n, 256), torch.zeros(n, 2048), 50.0 * torch.eye(10)[classes],
                                          "FMNIST features"))[0]

    assert balanced(10) == pytest.approx(1.0) and balanced(100) < 7.0 and balanced(MEANINGFUL_SAMPLES) > 9.0
    assert "10 sets of 1 (" in small_sample_warning(10) and "one sample per set scores exactly 1.0" in small_sample_warning(10)
    assert small_sample_warning(MEANINGFUL_SAMPLES - 1) is not None and small_sample_warning(MEANINGFUL_SAMPLES) is None


def test_generative_metrics_are_named_after_the_feature_network_and_warn_below_the_recommended_count(
    sets, caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="questdiff.eval.generative"):
        metrics = generative_metrics(sets["b"], sets["a"])
    assert set(metrics) == {
        f"{name} (FMNIST features)" for name in ("FID", "sFID", "IS", "IS std", "KID", "KID std")
    }
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["FID (FMNIST features)"] == frechet_distance(sets["b"], sets["a"])
    assert "256 images" in caplog.text and f">= {RECOMMENDED_SAMPLES} recommended" in caplog.text
    assert "256 samples are too few for IS and KID" in caplog.text


def test_features_of_different_networks_are_not_compared(sets) -> None:
    other = FeatureSet(sets["a"].pool, sets["a"].spatial, sets["a"].logits, "MNIST features")
    with pytest.raises(ValueError, match="same feature network"):
        generative_metrics(sets["b"], other)
