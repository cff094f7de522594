"""Fixtures for the evaluation tests: a random-init feature network with calibrated BatchNorm statistics (so its
features have unit scale, like a trained network's) and smooth synthetic grey images."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from questdiff.eval.feature_net import FeatureNet


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """``[n, 1, 32, 32]`` float in [0, 1]: 8x8 uniform noise upsampled bilinearly (blob-like, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 8, 8, generator=g)
    return F.interpolate(low, size=32, mode="bilinear", align_corners=False).clamp(0, 1)


@pytest.fixture(scope="session")
def feature_net() -> FeatureNet:
    torch.manual_seed(0)
    net = FeatureNet()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for seed in range(4):
            net(smooth_images(128, 1000 + seed))
    return net.eval()


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    return smooth_images(256, 0)


@pytest.fixture(scope="session")
def make_images() -> Callable[[int, int], torch.Tensor]:
    """``make_images(n, seed)``: more smooth synthetic images."""
    return smooth_images
