import pytest
import torch
from torch import nn

from questdiff.config import ActivationSpec, WeightSpec
from questdiff.calibration.weights import init_weights
from questdiff.nn import ActQuantizer, QuantConv2d, QuantConvTranspose2d, QuantLinear, WeightQuantizer, is_quantizable, wrap_layer
from questdiff.nn.layers import quant_layout
from questdiff.timestep import TimestepSchedule, TimestepState

STATE = TimestepState(TimestepSchedule((500.0,)))


def _wrap(module, split=0, spec=WeightSpec()):
    channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    dim = -1 if isinstance(module, nn.Linear) else 1
    w = quant_layout(module, module.weight)
    if not split:
        return wrap_layer(module, WeightQuantizer(w.shape, spec), ActQuantizer(1, ActivationSpec(), STATE, channels, dim))
    return wrap_layer(
        module, WeightQuantizer(w[:, :split].shape, WeightSpec()), ActQuantizer(1, ActivationSpec(), STATE, split, dim), split,
        WeightQuantizer(w[:, split:].shape, WeightSpec()), ActQuantizer(1, ActivationSpec(), STATE, channels - split, dim),
    )


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Linear(7, 5), (3, 4, 7)),
        (nn.Conv2d(4, 6, 3, padding=1), (2, 4, 8, 8)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), (2, 4, 8, 8)),
        (nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
        (nn.Conv3d(4, 6, 3, padding=1), (2, 4, 3, 5, 5)),
        (nn.ConvTranspose2d(4, 6, 2, stride=2), (2, 4, 5, 5)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1), (2, 4, 5, 5)),
        (nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1), (2, 4, 7)),
    ],
)
def test_disabled_wrapper_is_bit_exact(module, shape):
    x = torch.randn(shape)
    ref = module(x)
    q = _wrap(module)
    q.set_quant_state(False, False)
    assert torch.equal(q(x), ref)
    assert isinstance(q, type(module))  # diffusers/LoRA isinstance checks keep working
    assert q.weight is module.weight  # parameters are shared, not copied


def test_enabled_wrapper_quantizes():
    lin = nn.Linear(8, 4)
    q = _wrap(lin)
    q.weight_quantizer.set_qparams(torch.full((4, 1), 0.5), torch.full((4, 1), 128.0))
    q.act_quantizer.set_row(0, torch.tensor(0.25), torch.tensor(0.0))
    x = torch.randn(2, 8)
    expected = nn.functional.linear(torch.clamp(torch.round(x / 0.25), 0, 255) * 0.25, torch.round(lin.weight / 0.5).clamp(-128, 127) * 0.5, lin.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)


def test_split_input_uses_separate_quantizers():
    conv = nn.Conv2d(6, 4, 1)
    q = _wrap(conv, split=2)
    assert isinstance(q, QuantConv2d) and q.split == 2
    q.act_quantizer.set_row(0, torch.tensor(1.0), torch.tensor(0.0))
    q.act_quantizer_skip.set_row(0, torch.tensor(0.01), torch.tensor(0.0))
    q.set_quant_state(False, True)
    x = torch.rand(1, 6, 2, 2)
    h = q.quantize_input(x)
    assert torch.equal(h[:, :2], torch.round(x[:, :2]))  # coarse half
    assert torch.allclose(h[:, 2:], x[:, 2:], atol=0.005)  # fine half
    q.set_quant_state(False, False)
    assert torch.equal(q(x), conv(x))


def test_fp_copy_is_the_teacher_when_weights_unquantized():
    lin = nn.Linear(3, 3)
    q = _wrap(lin)
    x = torch.randn(2, 3)
    ref = lin(x)
    q.keep_fp_copy()
    with torch.no_grad():
        q.weight.add_(1.0)
    q.set_quant_state(False, False)
    assert torch.equal(q(x), ref)
    assert "fp_weight" not in q.state_dict()


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="only Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d"):
        wrap_layer(nn.Bilinear(2, 2, 2), None, None)


def test_transposed_conv_quantizes_per_output_channel_and_keeps_output_size():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)  # weight [C_in=4, C_out/groups=3, 3, 3]
    with torch.no_grad():  # a different range per output channel
        up.weight.mul_(torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))
        up.weight[2:].mul_(10.0)
    q = _wrap(up, spec=WeightSpec(bits=4, scale_method="minmax"))
    assert q.weight_quantizer.scale.shape == (6, 1, 1, 1)  # one scale per output channel
    init_weights(q)
    # output channel o = g * 3 + j reads weight[g*2:(g+1)*2, j]: its scale is that slice's range / 15
    for o in range(6):
        g, j = divmod(o, 3)
        part = up.weight[g * 2:(g + 1) * 2, j]
        expected = (part.max().clamp(min=0) - part.min().clamp(max=0)) / 15
        assert torch.allclose(q.weight_quantizer.scale[o].flatten(), expected.reshape(1), rtol=1e-5)
    w = q.quantized_weight()
    assert w.shape == up.weight.shape and not torch.equal(w, up.weight)
    for o in range(6):  # each output channel lies on its own 16-level grid
        g, j = divmod(o, 3)
        levels = torch.unique(torch.round(w[g * 2:(g + 1) * 2, j] / q.weight_quantizer.scale[o], decimals=3))
        assert torch.allclose(levels, levels.round()) and len(levels) <= 16
    q.set_quant_state(True, False)
    x = torch.randn(1, 4, 5, 5)
    out = q(x, output_size=[10, 10])
    assert out.shape == (1, 6, 10, 10)
    assert torch.allclose(out, nn.functional.conv_transpose2d(x, w, up.bias, 2, 1, 1, 2), atol=1e-6)


class _Scaled(nn.Linear):
    """A Linear subclass that keeps the torch forward (only adds a method)."""

    def describe(self):
        return "scaled"


class _OwnForward(nn.Conv2d):
    """A Conv2d subclass with a forward of its own: wrapping it would change what it computes."""

    def forward(self, x):
        return super().forward(x) * 2


def test_subclasses_are_wrapped_only_when_they_keep_the_torch_forward():
    sub = _Scaled(4, 3)
    assert is_quantizable(sub) and not is_quantizable(_OwnForward(2, 2, 1))
    q = _wrap(sub)
    assert isinstance(q, QuantLinear) and isinstance(q, nn.Linear) and not is_quantizable(q)  # never wrapped twice
    q.set_quant_state(False, False)
    x = torch.randn(2, 4)
    assert torch.equal(q(x), sub(x))
    assert isinstance(_wrap(nn.ConvTranspose2d(2, 2, 2)), (QuantConvTranspose2d, nn.ConvTranspose2d))


def test_frozen_quantized_weight_gives_the_same_output_until_thawed():
    q = _wrap(nn.Linear(3, 3))
    x = torch.randn(2, 3)
    ref = q(x)
    q.freeze_quantized_weight()
    assert torch.equal(q(x), ref) and "frozen_qweight" not in q.state_dict()
    with torch.no_grad():
        q.weight.add_(1.0)
    assert torch.equal(q(x), ref)  # frozen: the weight change is not seen
    q.thaw_quantized_weight()
    assert not torch.equal(q(x), ref)
