"""Input-channel smoothing: folding ``s`` into the weight keeps every layer's float output (any conv geometry, split
skip convs, before a rotation), and a smoothed 4-bit per-tensor activation grid loses less on outlier channels."""
import copy

import pytest
import torch
from torch import nn

from questdiff.config import ActivationSpec, ConfigError, WeightSpec
from questdiff.nn import ActQuantizer, WeightQuantizer, wrap_layer
from questdiff.nn.layers import quant_layout
from questdiff.nn.rotation import ChannelRotation
from questdiff.nn.smoothing import ChannelSmoothing, smoothing_factors
from questdiff.primitives import search_minmax
from questdiff.timestep import TimestepSchedule, TimestepState

STATE = TimestepState(TimestepSchedule((500.0,)))


def _smoothable(module, split=0, spec=ActivationSpec(bits=4, smoothing=0.5)):
    linear = isinstance(module, nn.Linear)
    channels, dim = (module.in_features, -1) if linear else (module.in_channels, 1)
    w = quant_layout(module, module.weight)
    if not split:
        layer = wrap_layer(module, WeightQuantizer(w.shape, WeightSpec()), ActQuantizer(1, spec, STATE, channels, dim))
    else:
        layer = wrap_layer(
            module, WeightQuantizer(w[:, :split].shape, WeightSpec()), ActQuantizer(1, spec, STATE, split, dim), split,
            WeightQuantizer(w[:, split:].shape, WeightSpec()), ActQuantizer(1, spec, STATE, channels - split, dim))
    layer.smoothing = ChannelSmoothing(channels, dim)
    return layer


@pytest.mark.parametrize("module, shape, split, rotate", [
    (nn.Linear(16, 5), (3, 4, 16), 0, False),
    (nn.Linear(16, 5), (3, 4, 16), 0, True),
    (nn.Conv2d(16, 6, 3, padding=1), (2, 16, 6, 6), 0, True),
    (nn.Conv2d(16, 6, 3, padding=1, padding_mode="reflect"), (2, 16, 6, 6), 0, False),
    (nn.Conv2d(16, 6, 1), (2, 16, 5, 5), 8, False),
    (nn.Conv2d(16, 8, 3, padding=1, groups=4), (2, 16, 5, 5), 0, False),
    (nn.Conv1d(8, 6, 3, padding=1), (2, 8, 9), 0, False),
    (nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), (2, 8, 5, 5), 0, False),
    (nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, groups=2), (2, 8, 5, 5), 0, False),
])
def test_smoothed_layer_keeps_the_float_output(module, shape, split, rotate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    channels = shape[-1] if isinstance(module, nn.Linear) else shape[1]
    s = torch.rand(channels, generator=g) * 10 + 0.1  # far from 1: a wrong column would show
    with torch.no_grad():
        ref = module(x)
        q = _smoothable(module, split)
        if rotate:
            q.rotate_inputs(ChannelRotation(channels, 8, q.smoothing.dim))
        before = q.weight.detach().clone()
        q.smooth_inputs(s)
        q.set_quant_state(False, False)
        torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)
    assert q.weight is module.weight and not torch.allclose(q.weight, before)  # folded in place, still shared
    assert torch.equal(q.smoothing.scale, s)
    with pytest.raises(ValueError, match="already smoothed"):
        q.smooth_inputs(s)


def test_factors_follow_smoothquant_and_leave_dead_channels_alone():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(act, weight, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(smoothing_factors(act[:2], weight[:2], 1.0), act[:2])  # alpha 1: all into the weight


def test_smoothing_lowers_the_per_tensor_4_bit_error_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 40]] *= 20  # outlier channels stretch the per-tensor range
    base = nn.Linear(64, 32)
    plain = _smoothable(copy.deepcopy(base))
    smoothed = _smoothable(base)
    smoothed.smooth_inputs(smoothing_factors(x.abs().amax(0), base.weight.abs().amax(0), 0.5))
    errors = []
    for layer in (plain, smoothed):
        with torch.no_grad():
            layer.set_quant_state(False, False)
            ref = layer(x)
            layer.act_quantizer.set_row(0, *search_minmax(layer.quantize_input(x), 4, False))
            layer.set_quant_state(False, True)
            errors.append(float(((layer(x) - ref) ** 2).mean()))
    assert not smoothed.act_quantizer.per_channel
    assert errors[1] < 0.5 * errors[0], errors


def test_smoothing_is_saved_and_follows_copies_and_dtypes():
    q = _smoothable(nn.Linear(16, 4))
    q.smooth_inputs(torch.linspace(0.5, 2.0, 16))
    assert "smoothing.scale" in q.state_dict()  # from calibration data: checkpoints carry it
    twin = copy.deepcopy(q).to(torch.bfloat16)
    assert twin.smoothing is not q.smoothing and twin.smoothing.scale.dtype == torch.float32  # a grid: stays fp32
    x = torch.randn(2, 16)
    with torch.no_grad():
        q.set_quant_state(False, False)
        twin.set_quant_state(False, False)
        torch.testing.assert_close(twin(x.bfloat16()).float(), q(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("alpha", [0.0, 1.5, -0.5])
def test_alpha_outside_0_1_is_refused_naming_the_fix(alpha):
    with pytest.raises(ConfigError, match=r"alpha, in \(0, 1\]"):
        ActivationSpec(bits=4, smoothing=alpha)


def test_smoothing_makes_4_bit_activations_per_tensor():
    assert ActivationSpec(bits=4).per_channel
    assert not ActivationSpec(bits=4, smoothing=0.5).per_channel
    assert ActivationSpec(bits=4, smoothing=0.5, channelwise=True).per_channel
