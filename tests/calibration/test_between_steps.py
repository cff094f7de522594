"""No silent clipping between calibrated steps (#22), on a DDPM-tutorial-style UNet (``tests/tutorial_unet.py``,
trained for seconds) calibrated with the README's generic recipe at 20 of 50 DDIM steps: its activations grow as
t -> 0, so a row calibrated at one step clipped the steps after it that share the row (a 16-bit min-max model was
only ~24 dB from FP over the trajectory)."""
from __future__ import annotations

import copy

import pytest
import torch

import questdiff as qd
import tutorial_unet
from questdiff.config import ActivationSpec, QuantConfig, WeightSpec


def min_max(bits: int) -> QuantConfig:
    """W<bits>A<bits> with min-max activation ranges (the W8A8 preset's running statistics over one batch per step
    end at the same ranges here, at several times the cost)."""
    return QuantConfig(weight=WeightSpec(bits=bits), activation=ActivationSpec(bits=bits, scale_method="minmax"),
                       first_last_act_bits=None, running_stat=False)


@pytest.fixture(scope="module")
def tutorial():
    """The trained UNet, 64 recorded 50-step calibration trajectories (seed 100) and the FP trajectory of 8 other
    samples (seed 1)."""
    model = tutorial_unet.train(steps=300)
    with qd.record_calibration(model, "t") as rec:
        tutorial_unet.sample(model, tutorial_unet.scheduler(), 50, n=64, seed=100)
    return model, rec.result(), tutorial_unet.sample(model, tutorial_unet.scheduler(), 50, n=8, seed=1, trajectory=True)


def _psnr(tutorial, config, calib_steps: int, **select) -> float:
    """PSNR over the whole 50-step trajectory of the model quantized RTN on ``calib_steps`` of the 50 steps."""
    model, recorded, fp = tutorial
    quantized = qd.quantize(copy.deepcopy(model), config, recorded.select(calib_steps, **select),
                            adapter=qd.GenericAdapter("t"), progress=False)
    out = tutorial_unet.sample(quantized, tutorial_unet.scheduler(), 50, n=8, seed=1, trajectory=True)
    return float(10 * torch.log10(4 / ((out - fp) ** 2).mean()))  # images in [-1, 1]


def test_16_bit_model_stays_close_to_fp_between_calibrated_steps(tutorial):
    assert _psnr(tutorial, min_max(16), 20) >= 45  # measured: 61.8 dB (51.4 dB with all 50 steps calibrated)
    assert _psnr(tutorial, min_max(16), 20, keep_range_steps=False) < 35  # the clipping this guards against: 23.5


def test_8_bit_at_20_of_50_steps_is_within_half_a_db_of_all_50(tutorial):
    assert _psnr(tutorial, min_max(8), 20) >= _psnr(tutorial, min_max(8), 50) - 0.5  # measured: 24.9 vs 23.9 dB
