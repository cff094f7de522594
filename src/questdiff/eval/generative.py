"""FID, sFID, IS and KID on the project's feature network, computed by torchmetrics in float64.

The metrics read ``FeatureSet``s (see ``features.extract_features``): torchmetrics receives the precomputed
features through an identity "feature extractor", so the network runs once per image set for all four metrics.
The features hold every sample (gathered before, see ``sampling.generate``), so the metrics never sync over a process
group (``sync_on_compute=False``): under torchrun rank 0 alone computes them.
Names carry the feature network, e.g. ``"FID (FMNIST features)"``: these numbers are not comparable to
Inception-v3 FIDs.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from .features import FeatureSet

logger = logging.getLogger(__name__)

RECOMMENDED_SAMPLES = 2048  # 8x the 256 pooled dims; below this the covariance estimate inflates FID
IS_SPLITS = 10
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# IS splits of 50 samples (a 10-class split's class marginal then biases IS by less than ~10 %), KID subsets of 500
MEANINGFUL_SAMPLES = 500


def small_sample_warning(num_samples: int) -> str | None:
    """Why IS and KID of ``num_samples`` generated images mean nothing, or ``None`` when there are enough."""
    if num_samples >= MEANINGFUL_SAMPLES:
        return None
    return (f"{num_samples} samples are too few for IS and KID to mean anything: IS splits them into {IS_SPLITS} sets "
            f"of {num_samples // IS_SPLITS} (smaller sets pull IS towards 1.0 whatever the model; one sample per set "
            f"scores exactly 1.0) and KID compares subsets of "
            f"{min(num_samples, KID_SUBSET_SIZE)} (noise-dominated, negative values included); use {MEANINGFUL_SAMPLES} "
            f"or more samples for IS/KID ({RECOMMENDED_SAMPLES} or more for FID)")


class _Precomputed(nn.Module):
    """Identity feature extractor for torchmetrics: input ``[N, D]`` features, output ``[N, D]`` float64."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of probing with a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def _check_pair(fake: FeatureSet, real: FeatureSet) -> None:
    if fake.label != real.label:
        raise ValueError(
            f"generated features come from {fake.label!r} but reference features from {real.label!r}; "
            "extract both sets with the same feature network"
        )
    for name, feats in (("generated", fake), ("reference", real)):
        if len(feats) < 2:
            raise ValueError(f"{name} set has {len(feats)} image(s); FID/KID need at least 2 per set")
        if len(feats) < RECOMMENDED_SAMPLES:
            logger.warning(
                "%s set has %d images: FID/sFID with %s are biased upward below %d samples (>= %d recommended); "
                "compare numbers only at equal sample counts",
                name, len(feats), feats.label, RECOMMENDED_SAMPLES, RECOMMENDED_SAMPLES,
            )


def frechet_distance(
    fake: FeatureSet, real: FeatureSet, key: str = "pool", device: str | torch.device = "cpu"
) -> float:
    """Fréchet distance between Gaussians fitted to ``fake.<key>`` ``[N, D]`` and ``real.<key>`` ``[M, D]``.

    ``key="pool"`` is FID, ``key="spatial"`` is sFID. Statistics are accumulated in float64 on ``device``.
    """
    if key not in ("pool", "spatial"):
        raise ValueError(f"key must be 'pool' (FID) or 'spatial' (sFID), got {key!r}")
    fake_x, real_x = getattr(fake, key), getattr(real, key)
    metric = FrechetInceptionDistance(feature=_Precomputed(fake_x.shape[1]), sync_on_compute=False).to(device)
    metric.update(real_x.to(device), real=True)
    metric.update(fake_x.to(device), real=False)
    return float(metric.compute())


def kernel_distance(
    fake: FeatureSet,
    real: FeatureSet,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets) on the pooled features ``[N, 256]``.

    ``subset_size`` is capped at the smaller set size; ``seed`` fixes the subset draws.
    """
    size = min(subset_size, len(fake), len(real))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        metric = KernelInceptionDistance(feature=_Precomputed(fake.pool.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric = metric.to(device)
    metric.update(real.pool.to(device), real=True)
    metric.update(fake.pool.to(device), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(
    feats: FeatureSet, splits: int = IS_SPLITS, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """Inception score (mean, std over ``splits``) from the softmax of ``feats.logits`` ``[N, 10]``.

    The feature network has 10 classes, so the score lies in [1, 10]. ``seed`` fixes the shuffle before splitting.
    """
    if len(feats) < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {len(feats)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        metric = InceptionScore(feature=_Precomputed(feats.logits.shape[1]), splits=splits, sync_on_compute=False)
    metric = metric.to(device)
    metric.update(feats.logits.to(device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def generative_metrics(
    fake: FeatureSet, real: FeatureSet, seed: int = 0, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """FID, sFID, IS and KID of a generated set against a reference set, named after the feature network.

    Returns e.g. ``{"FID (FMNIST features)": ..., "sFID (FMNIST features)": ..., "IS (FMNIST features)": ...,
    "IS std (FMNIST features)": ..., "KID (FMNIST features)": ..., "KID std (FMNIST features)": ...}``.
    Logs a warning when a set has fewer than ``RECOMMENDED_SAMPLES`` images, and when the generated set is too small
    for IS and KID (``small_sample_warning``).
    """
    _check_pair(fake, real)
    caveat = small_sample_warning(len(fake))
    if caveat is not None:
        logger.warning("%s", caveat)
    label = fake.label
    is_mean, is_std = inception_score(fake, seed=seed, device=device)
    kid_mean, kid_std = kernel_distance(fake, real, seed=seed, device=device)
    return {
        f"FID ({label})": frechet_distance(fake, real, "pool", device),
        f"sFID ({label})": frechet_distance(fake, real, "spatial", device),
        f"IS ({label})": is_mean,
        f"IS std ({label})": is_std,
        f"KID ({label})": kid_mean,
        f"KID std ({label})": kid_std,
    }
