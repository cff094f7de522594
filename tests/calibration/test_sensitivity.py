"""Sensitivity ranking: a layer whose input has one huge outlier channel is ranked first at 4 bits."""
from __future__ import annotations

import itertools

import torch

import questdiff as qd
from questdiff.calibration import layer_sensitivity
from questdiff.prepare import act_quantizers


def _make_conv_out_fragile(unet) -> None:
    """Channel 0 of conv_out's input becomes ~1000x larger (its weight column 1000x smaller): the FP model barely
    changes, but a per-tensor 4-bit range of that input wipes out every other channel."""
    with torch.no_grad():
        unet.conv_norm_out.weight[0] *= 1000.0
        unet.conv_norm_out.bias[0] *= 1000.0
        unet.conv_out.weight[:, 0] /= 1000.0


def test_fragile_layer_is_ranked_first(unet, calib):
    _make_conv_out_fragile(unet)
    qd.quantize(unet, "W8A8", calib, "rtn", progress=False)
    enabled = {n: q.enabled for n, q in act_quantizers(unet).items()}
    ranking = layer_sensitivity(unet, calib, bits=4, per_channel=False, samples_per_t=2, progress=False)
    print("sensitivity top 3:", [(s.name, round(s.mse, 5)) for s in ranking[:3]])
    assert ranking[0].name == "conv_out"
    assert ranking[0].mse > 3 * ranking[1].mse
    assert len(ranking) == 51 and all(a.mse >= b.mse for a, b in itertools.pairwise(ranking))
    assert {n: q.enabled for n, q in act_quantizers(unet).items()} == enabled  # quantizers restored
    by_role = layer_sensitivity(unet, calib, bits=4, per_channel=False, group_by="role", samples_per_t=2,
                                exclude_roles=("time_embed", "time_proj"), progress=False)
    assert by_role[0].name == "last" and by_role[0].layers == ["conv_out"]
    assert "time_proj" not in {s.name for s in by_role}


def test_unmodified_model_ranks_differently(unet, calib):
    qd.quantize(unet, "W8A8", calib, "rtn", progress=False)
    ranking = layer_sensitivity(unet, calib, bits=4, per_channel=False, samples_per_t=2, progress=False,
                                others="quantized", timesteps=(900.0,))
    assert ranking[0].name != "conv_out" or ranking[0].mse < 3 * ranking[1].mse


def test_layers_kept_wider_than_the_model_bits_are_not_probed(unet, calib):
    qd.quantize(unet, "W4A4", calib, "rtn", progress=False)  # first/last layers keep 8-bit inputs
    names = {s.name for s in layer_sensitivity(unet, calib, bits=4, samples_per_t=1, timesteps=(900.0,), progress=False)}
    assert "conv_out" not in names and "conv_in" not in names and len(names) == 49



def test_rotated_layers_are_probed_on_the_rotated_input():
    """The probe quantizes what the layer's quantizer receives: the rotated input, not the layer's argument."""
    from torch import nn

    from questdiff.calibration.sensitivity import _probe, low_bit_inputs
    from questdiff.config import ActivationSpec, WeightSpec
    from questdiff.nn import ActQuantizer, WeightQuantizer, wrap_layer
    from questdiff.nn.rotation import ChannelRotation
    from questdiff.timestep import TimestepSchedule, TimestepState

    state = TimestepState(TimestepSchedule((500.0,)))
    layer = wrap_layer(nn.Linear(16, 4), WeightQuantizer((4, 16), WeightSpec()),
                       ActQuantizer(1, ActivationSpec(bits=4, rotation=16), state, 16, -1))
    layer.rotate_inputs(ChannelRotation(16, 16, -1))
    layer.set_quant_state(False, False)
    x = torch.randn(32, 16)
    x[:, 0] *= 30  # an outlier channel: probing before or after the rotation differs a lot
    with torch.no_grad(), low_bit_inputs(None, ["l"], 4, False, {"l": layer}):
        out = layer(x)
    expected = nn.functional.linear(_probe(layer.rotation(x), 4, False, None), layer.weight, layer.bias)
    torch.testing.assert_close(out, expected)
