"""Zoo pipelines refuse fractional class labels instead of truncating them (``class_labels=[3.7]`` was class 3)."""
from __future__ import annotations

import pytest
import torch

from questdiff.zoo.architectures import build_class_embedder, build_cond_unet, build_scheduler, build_vae
from questdiff.zoo.pipelines import ClassConditionalLDMPipeline, _class_labels


@pytest.fixture(scope="module")
def pipe() -> ClassConditionalLDMPipeline:
    torch.manual_seed(0)
    return ClassConditionalLDMPipeline(
        vae=build_vae(tiny=True), unet=build_cond_unet(tiny=True), class_embedder=build_class_embedder(tiny=True),
        scheduler=build_scheduler("ldm"),
    )


@pytest.mark.parametrize("labels", [[3.7], torch.tensor([0.5, 1.0])])
def test_fractional_class_labels_are_refused(pipe, labels) -> None:
    with pytest.raises(ValueError, match="class_labels must be whole class indices"):
        pipe(class_labels=labels, num_inference_steps=1, output_type="pt")


def test_whole_float_labels_are_classes() -> None:
    torch.testing.assert_close(_class_labels([3.0, 1], None, 10, torch.device("cpu")), torch.tensor([3, 1]))
