"""Evaluation: FID/sFID/IS/KID on the project's feature network, PSNR/SSIM/feature distance of quantized samples
against the FP samples of the same seeds, class accuracy, reports, and per-sample-seeded sampling.

Inception-v3 FID and CLIP score with user-supplied weights live in ``questdiff.eval.standard``; the
``questdiff eval`` command in ``questdiff.eval.cli``. The names below are imported on first use: torchmetrics and
scipy load only when a metric is computed, not when the command line starts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

_ATTRIBUTES = {
    "class_accuracy": "accuracy",
    "FeatureNet": "feature_net",
    "FeatureSet": "features",
    "extract_features": "features",
    "feature_label": "features",
    "validate_images": "features",
    "feature_distance": "fidelity",
    "fidelity_metrics": "fidelity",
    "psnr": "fidelity",
    "ssim": "fidelity",
    "frechet_distance": "generative",
    "generative_metrics": "generative",
    "inception_score": "generative",
    "kernel_distance": "generative",
    "make_grid": "report",
    "save_grid": "report",
    "save_side_by_side": "report",
    "write_metrics_json": "report",
    "class_labels": "sampling",
    "generate": "sampling",
}

__all__ = [
    "FeatureNet",
    "FeatureSet",
    "class_accuracy",
    "class_labels",
    "extract_features",
    "feature_distance",
    "feature_label",
    "fidelity_metrics",
    "frechet_distance",
    "generate",
    "generative_metrics",
    "inception_score",
    "kernel_distance",
    "make_grid",
    "psnr",
    "save_grid",
    "save_side_by_side",
    "ssim",
    "validate_images",
    "write_metrics_json",
]

if TYPE_CHECKING:
    from .accuracy import class_accuracy
    from .feature_net import FeatureNet
    from .features import FeatureSet, extract_features, feature_label, validate_images
    from .fidelity import feature_distance, fidelity_metrics, psnr, ssim
    from .generative import frechet_distance, generative_metrics, inception_score, kernel_distance
    from .report import make_grid, save_grid, save_side_by_side, write_metrics_json
    from .sampling import class_labels, generate


__getattr__ = lazy_getattr(__name__, _ATTRIBUTES)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
