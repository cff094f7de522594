"""Class accuracy of class-conditional samples, judged by the feature network's classifier head."""
from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy

from .features import FeatureSet


def class_accuracy(feats: FeatureSet, labels: torch.Tensor | list[int]) -> dict[str, float | dict[str, float]]:
    """Fraction of samples whose predicted class (argmax of ``feats.logits`` ``[N, C]``) equals ``labels`` ``[N]``.

    Returns ``{"class accuracy (FMNIST features)": overall, "per-class accuracy (FMNIST features)": {"0": ..., ...}}``;
    the per-class dict lists only the classes present in ``labels``.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    num_classes = feats.logits.shape[1]
    if labels.shape != (len(feats),):
        raise ValueError(f"labels must have shape [{len(feats)}] (one per sample), got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{labels.min()}, {labels.max()}]")
    preds = feats.logits.argmax(dim=1)
    overall = multiclass_accuracy(preds, labels, num_classes=num_classes, average="micro")
    per_class = multiclass_accuracy(preds, labels, num_classes=num_classes, average="none")
    present = torch.bincount(labels, minlength=num_classes) > 0
    return {
        f"class accuracy ({feats.label})": float(overall),
        f"per-class accuracy ({feats.label})": {
            str(c): float(per_class[c]) for c in range(num_classes) if present[c]
        },
    }
