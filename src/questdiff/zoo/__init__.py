"""The reference zoo: small diffusers models trained by the project on (Fashion-)MNIST and shipped in the package.

>>> import questdiff.zoo as zoo
>>> pipe = zoo.load("fmnist-ldm-cond")                      # DDIM 20 steps, eta 0, guidance 3 by default
>>> images = pipe(class_labels=[0, 1], output_type="pt").images   # [2, 1, 32, 32] in [0, 1]
>>> net = zoo.load_feature_net("fmnist-features")            # FeatureNet in eval mode
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr
from .registry import FEATURES, SPECS, SamplerDefaults, ZooEntry, entry, get_spec, is_shipped, weights_dir

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from ..eval.feature_net import FeatureNet
    from .loading import PIPELINE_CLASSES, ZooWeightsError, check_weights, load_pipeline
    from .pipelines import (
        ClassConditionalDiTPipeline,
        ClassConditionalLDMPipeline,
        ClassEmbedder,
        LatentDiffusionPipeline,
        PixelDiffusionPipeline,
    )

# loaded on first use (they import diffusers' pipelines): `questdiff zoo list` needs only the registry
_LAZY = {
    "PIPELINE_CLASSES": "loading",
    "ZooWeightsError": "loading",
    "check_weights": "loading",
    "load_feature_net_from": "loading",
    "load_pipeline": "loading",
    "ClassConditionalDiTPipeline": "pipelines",
    "ClassConditionalLDMPipeline": "pipelines",
    "ClassEmbedder": "pipelines",
    "LatentDiffusionPipeline": "pipelines",
    "PixelDiffusionPipeline": "pipelines",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "DEFAULT_MODEL",
    "PIPELINE_CLASSES",
    "ClassConditionalDiTPipeline",
    "ClassConditionalLDMPipeline",
    "ClassEmbedder",
    "LatentDiffusionPipeline",
    "PixelDiffusionPipeline",
    "SamplerDefaults",
    "ZooEntry",
    "ZooWeightsError",
    "check_weights",
    "has_default",
    "list_models",
    "load",
    "load_feature_net",
    "load_pipeline",
    "weights_dir",
]

DEFAULT_MODEL = "fmnist-ldm-cond"


def list_models() -> list[ZooEntry]:
    """Every zoo model (default first) with its kind, mirrored setting, sampler defaults and, when shipped,
    parameter count, size on disk and measured FID."""
    return [entry(name) for name in SPECS]


def has_default() -> bool:
    """True iff the weights of ``DEFAULT_MODEL`` are shipped (file presence only)."""
    return is_shipped(DEFAULT_MODEL)


def load(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """The shipped pipeline ``name`` (float32 unless ``dtype``), sampling with the paper setting by default.

    Raises ``ValueError`` for an unknown name or a feature net, ``ZooWeightsError`` naming a missing/corrupt file.
    """
    spec = get_spec(name)
    if spec.kind == FEATURES:
        raise ValueError(f"{name!r} is a feature network, not a pipeline; use questdiff.zoo.load_feature_net({name!r})")
    from .loading import load_pipeline

    return load_pipeline(weights_dir(name), spec.kind, device, dtype)


def load_feature_net(name: str = "fmnist-features", device: str | torch.device | None = None) -> FeatureNet:
    """The shipped feature network ``name`` (``"fmnist-features"`` or ``"mnist-features"``) in eval mode.

    Input ``[N, 1, 32, 32]`` in ``[0, 1]``; ``net.features(x)["pool"]`` is ``[N, 256]`` for FID.
    """
    spec = get_spec(name)
    if spec.kind != FEATURES:
        raise ValueError(f"{name!r} is a diffusion pipeline, not a feature network; use questdiff.zoo.load({name!r})")
    from .loading import load_feature_net_from

    return load_feature_net_from(weights_dir(name), device)
