"""Fixtures for the calibration-algorithm tests: synthetic, well-conditioned calibration sets (a random tiny UNet's
own samples diverge to |x| ~ 300, which makes reconstruction losses meaningless) and fresh tiny UNets.

The tests pin torch to one thread: on the shared 2-core CI machines torch's intra-op thread pool makes these tiny
ops 10-20x slower under load.
"""
from __future__ import annotations

import pytest
import torch

from builders import tiny_cond_unet, tiny_unet2d
from questdiff.calibration import CalibrationSet
from quest_helpers import synthetic_calibration


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def calib() -> CalibrationSet:
    return synthetic_calibration()


@pytest.fixture(scope="session")
def cond_calib() -> CalibrationSet:
    """For ``tiny_cond_unet``: 4x8x8 latents, one context token (class-conditional, ImageNet-like)."""
    return synthetic_calibration(8, shape=(4, 8, 8), context=(1, 32))


@pytest.fixture
def unet():
    return tiny_unet2d()


@pytest.fixture
def cond_unet():
    return tiny_cond_unet()
