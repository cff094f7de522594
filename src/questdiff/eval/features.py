"""Image validation and one-pass feature extraction with the project's feature network.

Every metric that uses the feature network (FID, sFID, IS, KID, class accuracy) reads a ``FeatureSet``, so the
network runs once per image set, and the real test set's features can be reused for several generated sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .feature_net import IMAGE_SIZE, FeatureNet

EXPECTED_FORMAT = f"[N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] float in [0, 1] or uint8 in [0, 255]"
_RANGE_TOLERANCE = 1e-4  # decoders and resizers overshoot [0, 1] by float rounding; such values are clamped


def feature_label(feature_net_name: str) -> str:
    """Metric-name suffix for a feature network: ``"fmnist-features"`` -> ``"FMNIST features"``."""
    stem = feature_net_name.removesuffix("-features")
    if not stem or stem == feature_net_name:
        raise ValueError(
            f"feature network name {feature_net_name!r} does not end in '-features'; "
            "use a zoo feature network name such as 'fmnist-features' or 'mnist-features'"
        )
    return f"{stem.upper()} features"


def validate_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Check the image format of the feature network and return the images as float32 in ``[0, 1]``.

    ``images``: ``[N, 1, 32, 32]`` float in [0, 1] or uint8 in [0, 255]. Returns ``[N, 1, 32, 32]`` float32 on the
    same device. Raises ``ValueError`` naming the expected format and the fix.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {EXPECTED_FORMAT}, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{name} must be {EXPECTED_FORMAT}, got shape {tuple(images.shape)}; "
            f"add the channel axis with x.unsqueeze(1) and pad/resize to {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty; pass at least one image of shape {EXPECTED_FORMAT}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"{name} must be {EXPECTED_FORMAT}, got dtype {images.dtype}; convert with x.float() / 255")
    images = images.float()
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or inf; check the sampler output before evaluating")
    lo, hi = images.min().item(), images.max().item()
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        fix = "divide by 255" if hi > 1.5 else "map [-1, 1] images with (x + 1) / 2" if lo < -0.5 else "clamp to [0, 1]"
        raise ValueError(f"{name} must be {EXPECTED_FORMAT}, got values in [{lo:.3g}, {hi:.3g}]; {fix}")
    return images.clamp(0.0, 1.0)


@dataclass(frozen=True)
class FeatureSet:
    """Feature-network outputs for one image set (float32, CPU).

    ``pool [N, 256]`` (FID, KID), ``spatial [N, 2048]`` (sFID), ``logits [N, 10]`` (IS, class accuracy);
    ``label`` names the network in metric names, e.g. ``"FMNIST features"``.
    """

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor
    label: str

    def __len__(self) -> int:
        return self.pool.shape[0]


@torch.no_grad()
def extract_features(
    net: FeatureNet,
    images: torch.Tensor,
    name: str,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> FeatureSet:
    """Run the feature network over ``images`` in batches, in eval mode.

    ``images``: ``[N, 1, 32, 32]`` float in [0, 1] or uint8 (see ``validate_images``); ``name``: the network's zoo
    name (``"fmnist-features"``), which becomes the metric label. ``net`` is put in eval mode on ``device``
    (default: the device it is on). Returns a ``FeatureSet`` of N rows on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    label = feature_label(name)
    images = validate_images(images)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net.eval().to(device)
    outputs: dict[str, list[torch.Tensor]] = {"pool": [], "spatial": [], "logits": []}
    for start in range(0, images.shape[0], batch_size):
        feats = net.features(images[start:start + batch_size].to(device))
        for key, chunks in outputs.items():
            chunks.append(feats[key].float().cpu())
    return FeatureSet(label=label, **{key: torch.cat(chunks) for key, chunks in outputs.items()})
