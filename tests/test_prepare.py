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
