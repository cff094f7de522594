"""Fixtures for the calibration-algorithm tests: synthetic, well-conditioned calibration sets (a random tiny UNet's
own samples diverge to |x| ~ 300, which makes reconstruction losses meaningless) and fresh tiny UNets."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # quest_helpers.py (tests run with --import-mode=importlib)

from builders import tiny_cond_unet, tiny_unet2d
from quest_helpers import synthetic_calibration

from questdiff.calibration import CalibrationSet


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
