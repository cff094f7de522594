"""``ActivationSpec.smoothing`` in calibration: ``weight_init`` smooths every layer it can from the calibration set
(the model's float output unchanged), the weight grids are those of the smoothed weight, layers it cannot smooth are
named, and a saved model reloads with its smoothing."""
import warnings

import pytest
import torch
from torch import nn

import questdiff as qd
from builders import SMOOTHED_W4A4, tiny_cond_unet
from questdiff.config import W4A4, ActivationSpec
from questdiff.prepare import quant_layers, set_quant_state


def _calib(unet):
    g = torch.Generator().manual_seed(0)
    with qd.record_calibration(unet) as rec:
        for t in (900, 500, 100):
            unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor(t),
                 encoder_hidden_states=torch.randn(2, 5, 32, generator=g))
    return rec.result()


def test_every_layer_is_smoothed_and_the_float_output_is_unchanged():
    fp, unet = tiny_cond_unet(), tiny_cond_unet()
    calib = _calib(fp)
    model = qd.quantize(unet, SMOOTHED_W4A4, calib, method="rtn", progress=False)
    layers = quant_layers(model)
    assert layers and all(layer.smoothing is not None for layer in layers.values())
    assert all(not torch.all(layer.smoothing.scale == 1) for layer in layers.values())
    assert all(not q.per_channel for layer in layers.values() for q in layer.act_quantizers())
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    set_quant_state(model, False, False)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(500), encoder_hidden_states=context).sample,
                                   fp(x, torch.tensor(500), encoder_hidden_states=context).sample, atol=1e-4, rtol=1e-4)
    # the weight grid is the smoothed weight's: its per-output-channel range is that of the folded weight
    layer = layers["conv_in"]
    w = layer.weight.detach().flatten(1)
    expected = (w.amax(1).clamp_min(0) - w.amin(1).clamp_max(0)) / 15
    assert torch.all(layer.weight_quantizer.scale.flatten() <= expected * 1.0001)
    assert torch.all(layer.weight_quantizer.scale.flatten() >= expected * 0.3)


def test_tied_weights_keep_s_1_and_are_named():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x, t):
            return self.c(self.b(self.a(x)))

    model = Tied()
    with qd.record_calibration(model, "t") as rec:
        for t in (900, 100):
            model(torch.randn(4, 8) * torch.linspace(0.1, 10, 8), torch.tensor(t))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qd.quantize(model, W4A4.replace(activation=ActivationSpec(bits=4, smoothing=0.5)), rec.result(),
                    method="rtn", adapter=qd.GenericAdapter("t"), progress=False)
    message = next(str(w.message) for w in caught if "unsmoothed" in str(w.message))
    named = message.split("): ", 1)[1].split(". ", 1)[0].split(", ")
    assert named == ["a", "b"], message
    assert torch.all(model.a.smoothing.scale == 1) and not torch.all(model.c.smoothing.scale == 1)


def test_a_saved_smoothed_model_reloads_bit_exactly(tmp_path):
    unet = tiny_cond_unet()
    calib = _calib(tiny_cond_unet())
    model = qd.quantize(unet, SMOOTHED_W4A4, calib, method="rtn", progress=False)
    qd.save(model, tmp_path)
    loaded = qd.load(tmp_path, base=tiny_cond_unet())
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor(500), encoder_hidden_states=context).sample,
                           model(x, torch.tensor(500), encoder_hidden_states=context).sample)
    assert torch.equal(loaded.conv_in.smoothing.scale, model.conv_in.smoothing.scale)


def test_cli_smooth_flag_reaches_the_config_or_fails_naming_the_option():
    from questdiff.cli import _preset
    from questdiff.cli_common import alpha_or_off

    assert _preset("W4A4").activation.smoothing is None  # the preset's default: QuEST's per-channel grid
    assert _preset("W4A4", smooth=alpha_or_off("0.3")).activation.smoothing == 0.3
    quest = _preset("W4A4", smooth=alpha_or_off("off")).activation
    assert quest.smoothing is None and quest.per_channel  # QuEST's own per-channel grid
    with pytest.raises(ValueError, match=r"^--smooth 2: .*alpha, in \(0, 1\]"):
        _preset("W4A4", smooth=alpha_or_off("2"))
