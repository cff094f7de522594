"""AdaRound quantizer math and reconstruction of one block (vs round-to-nearest)."""
from __future__ import annotations

import pytest
import torch

from questdiff.calibration.adaround import (
    AdaRoundConfig,
    beta_at,
    convert_layer,
    init_alpha,
    rounding_regularizer,
)
from questdiff.calibration.brecq import BrecqConfig, capture, reconstruct_unit
from questdiff.calibration.common import rows_by_quantizer_row
from questdiff.calibration.weights import init_weight_quantizer, init_weights
from questdiff.config import WeightSpec, preset
from questdiff.nn import WeightQuantizer
from questdiff.nn.adaround import AdaRoundQuantizer, floor_ste, rectified_sigmoid
from questdiff.prepare import prepare, quant_state
from questdiff.timestep import TimestepSchedule


def _quantizer(weight: torch.Tensor, bits: int = 4, **spec) -> AdaRoundQuantizer:
    base = WeightQuantizer(weight.shape, WeightSpec(bits=bits, **spec))
    init_weight_quantizer(base, weight)
    return AdaRoundQuantizer.from_quantizer(base)


def _in_range(q: AdaRoundQuantizer, w: torch.Tensor) -> torch.Tensor:
    x = torch.floor(w / q.scale) + q.zero_point
    return (x >= q.qmin) & (x + 1 <= q.qmax)


def test_alpha_init_makes_soft_rounding_the_identity():
    w = torch.randn(8, 5, 3, 3)
    q = _quantizer(w)
    q.set_soft(init_alpha(w, q.scale))
    h = q.rounding()
    x = w / q.scale
    torch.testing.assert_close(h, x - torch.floor(x), atol=1e-5, rtol=0)
    inside = _in_range(q, w)
    torch.testing.assert_close(q(w)[inside], w[inside], atol=1e-5, rtol=1e-5)


def test_hard_rounding_is_floor_plus_zero_or_one_on_the_grid():
    w = torch.randn(6, 16)
    q = _quantizer(w)
    alpha = q.set_soft(init_alpha(w, q.scale))
    with torch.no_grad():
        alpha.add_(torch.randn_like(alpha))
    decisions = alpha.detach() >= 0
    q.harden()
    assert q.alpha is None and not q.soft
    assert torch.equal(q.round_up, decisions)
    assert set(q.state_dict()) == {"scale", "zero_point", "round_up"} and q.round_up.dtype == torch.bool
    codes = q(w) / q.scale + q.zero_point
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    expected = torch.clamp(torch.floor(w / q.scale) + decisions + q.zero_point, q.qmin, q.qmax)
    torch.testing.assert_close(codes, expected, atol=1e-4, rtol=0)
    assert set(q.rounding().unique().tolist()) <= {0.0, 1.0}


def test_hard_mode_passes_straight_through_gradients_to_the_weight():
    w = torch.randn(4, 8)
    q = _quantizer(w, bits=8)
    q.set_soft(init_alpha(w, q.scale))
    q.harden()
    w = w.clone().requires_grad_(True)
    q(w).sum().backward()
    inside = _in_range(q, w.detach())
    assert torch.equal(w.grad[inside], torch.ones_like(w.grad[inside]))
    x = torch.tensor([0.3, 1.7], requires_grad=True)
    floor_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2))


def test_rectified_sigmoid_and_temperature_schedule():
    assert rectified_sigmoid(torch.tensor([-50.0, 50.0])).tolist() == [0.0, 1.0]
    config = AdaRoundConfig()
    assert beta_at(0, 100, config) == 20.0 and beta_at(19, 100, config) == 20.0
    assert beta_at(20, 100, config) == pytest.approx(20.0) and beta_at(100, 100, config) == pytest.approx(2.0)
    assert beta_at(60, 100, config) == pytest.approx(11.0)
    with pytest.raises(ValueError, match="zeta > 1"):
        AdaRoundConfig(zeta=0.9)


def test_regularizer_vanishes_at_hard_decisions():
    w = torch.randn(4, 8)
    q = _quantizer(w)
    q.set_soft(torch.full_like(w, 30.0))
    assert float(rounding_regularizer([q], 2.0).detach()) == pytest.approx(0.0, abs=1e-6)
    q.set_soft(torch.zeros_like(w))  # h = 0.5: maximal penalty 1 per element
    assert float(rounding_regularizer([q], 2.0).detach()) == pytest.approx(w.numel())


def test_split_layer_converts_both_halves(unet, calib):
    prepare(unet, preset("W4A8"), TimestepSchedule.from_timesteps(calib.timesteps))
    init_weights(unet)
    layer = unet.get_submodule("up_blocks.0.resnets.0.conv_shortcut")
    assert layer.split
    quantizers = convert_layer(layer, soft=True)
    assert len(quantizers) == 2 and layer.weight_quantizer_skip is quantizers[1]
    assert quantizers[0].alpha.shape == layer.weight[:, : layer.split].shape


def test_adaround_beats_round_to_nearest_on_a_block(unet, calib):
    prepare(unet, preset("W4A8"), TimestepSchedule.from_timesteps(calib.timesteps))
    init_weights(unet)
    block = unet.get_submodule("up_blocks.0.resnets.0")
    parts = [p for ps in rows_by_quantizer_row(unet, calib).values() for p in ps]
    device = torch.device("cpu")
    kwargs = {"device": device, "batch_size": 64, "storage": device}
    with quant_state(unet, weight=True, act=False):
        inputs = capture(unet, block, calib, parts, what="input", **kwargs)
        with quant_state(unet, weight=False, act=False):
            targets = capture(unet, block, calib, parts, what="output", **kwargs)
        result = reconstruct_unit(block, inputs, targets, BrecqConfig(iters=300, batch_size=16, lr=1e-2), device=device)
    print(f"AdaRound block reconstruction (up_blocks.0.resnets.0, W4): RTN {result.rtn_loss:.4f} -> {result.loss:.4f}")
    assert result.loss < 0.9 * result.rtn_loss
    quantizers = [m for m in block.modules() if isinstance(m, AdaRoundQuantizer)]
    assert len(quantizers) == 5  # conv1, time_emb_proj, conv2, split shortcut (2 halves)
    for q in quantizers:
        assert not q.soft and set(q.rounding().unique().tolist()) <= {0.0, 1.0}
