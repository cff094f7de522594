"""prepare: which layers get wrapped, and the warning naming every weight-bearing layer left in full precision."""
import warnings

import torch
from torch import nn

import questdiff as qd
from questdiff.config import W8A8
from questdiff.nn import QuantConvTranspose2d, QuantLayerMixin, QuantLinear
from questdiff.prepare import full_precision_layers, prepare


class _KeepsForward(nn.Linear):
    pass


class _OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class Mixed(nn.Module):
    """Supported layers (a transposed conv, a Linear subclass) beside ones questdiff cannot quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.mix = _KeepsForward(4, 4)
        self.bilinear = nn.Bilinear(4, 4, 4)
        self.own = _OwnForward(4, 1, 1)
        self.label = nn.Embedding(10, 4)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x, t):
        h = self.norm(self.inp(x)) + self.label(torch.zeros_like(t).long())[:, :, None, None]
        h = self.mix(self.up(h).permute(0, 2, 3, 1))
        h = self.bilinear(h, h).permute(0, 3, 1, 2)
        return self.own(h)


def test_transposed_convs_and_subclasses_are_wrapped_and_the_rest_is_named_once():
    model = Mixed()
    schedule = qd.TimestepSchedule.from_timesteps([500.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(model, W8A8, schedule, qd.GenericAdapter("t"))
    assert isinstance(model.up, QuantConvTranspose2d) and isinstance(model.mix, QuantLinear)
    assert isinstance(model.mix, nn.Linear)
    messages = [str(w.message) for w in caught if "full precision" in str(w.message)]
    assert len(messages) == 1
    assert "bilinear (Bilinear)" in messages[0] and "own (_OwnForward)" in messages[0]
    assert "label" not in messages[0] and "norm" not in messages[0]  # lookups and norms stay FP silently
    assert full_precision_layers(model) == ["bilinear (Bilinear)", "own (_OwnForward)"]
    assert {n for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)} == {"inp", "up", "mix"}


def test_a_fully_supported_model_prepares_without_warning():
    from builders import tiny_unet2d

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(tiny_unet2d(), W8A8, qd.TimestepSchedule.from_timesteps([500.0, 100.0]))


def test_rotation_keeps_the_float_output_and_names_the_layers_it_cannot_rotate():
    from builders import tiny_cond_unet

    from questdiff.config import W4A4, ActivationSpec
    from questdiff.prepare import act_quantizers, quant_layers, set_quant_state

    fp = tiny_cond_unet()
    model = tiny_cond_unet()
    config = W4A4.replace(activation=ActivationSpec(bits=4, rotation=16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(model, config, qd.TimestepSchedule.from_timesteps([500.0]))
    messages = [str(w.message) for w in caught if "unrotated" in str(w.message)]
    assert len(messages) == 1 and "conv_in (4 input channels)" in messages[0]
    layers = quant_layers(model)
    rotated = {n for n, m in layers.items() if m.rotation is not None}
    assert rotated == set(layers) - {"conv_in"}
    assert any(layers[n].split for n in rotated) and any(isinstance(layers[n], nn.Linear) for n in rotated)
    assert not any(q.per_channel for q in act_quantizers(model).values())  # deployable per-tensor grids
    set_quant_state(model, False, False)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        ref = fp(x, torch.tensor(500), encoder_hidden_states=context).sample
        out = model(x, torch.tensor(500), encoder_hidden_states=context).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rotation_skips_grouped_convs_and_tied_weights():
    from questdiff.config import W4A4, ActivationSpec

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.c = nn.Linear(8, 8)

        def forward(self, x, t):
            h = self.depthwise(x[:, :, None, None]).flatten(1)
            return self.c(self.b(self.a(h)))

    model = Tied()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(model, W4A4.replace(activation=ActivationSpec(bits=4, rotation=8)),
                qd.TimestepSchedule.from_timesteps([500.0]), qd.GenericAdapter("t"))
    message = next(str(w.message) for w in caught if "unrotated" in str(w.message))
    assert "depthwise (groups=8)" in message and "a (weight shared" in message and "b (weight shared" in message
    assert model.c.rotation is not None and model.a.rotation is None
