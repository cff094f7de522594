from __future__ import annotations

import pytest
import torch

from questdiff.eval.accuracy import class_accuracy
from questdiff.eval.features import FeatureSet


def _feats(predicted: list[int]) -> FeatureSet:
    n = len(predicted)
    return FeatureSet(torch.zeros(n, 256), torch.zeros(n, 2048), torch.eye(10)[predicted], "FMNIST features")


def test_overall_and_per_class_accuracy() -> None:
    labels = [0, 0, 0, 0, 1, 1, 2, 2]
    predicted = [0, 0, 0, 5, 1, 0, 2, 2]
    result = class_accuracy(_feats(predicted), labels)
    assert result["class accuracy (FMNIST features)"] == pytest.approx(6 / 8)
    assert result["per-class accuracy (FMNIST features)"] == pytest.approx({"0": 0.75, "1": 0.5, "2": 1.0})


def test_bad_labels_raise() -> None:
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        class_accuracy(_feats([0, 1, 2]), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        class_accuracy(_feats([0, 1, 2]), [0, 1, 10])
