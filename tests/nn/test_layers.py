import pytest
import torch
from torch import nn

from questdiff.config import ActivationSpec, WeightSpec
from questdiff.nn import ActQuantizer, QuantConv2d, WeightQuantizer, wrap_layer
from questdiff.timestep import TimestepSchedule, TimestepState

STATE = TimestepState(TimestepSchedule((500.0,)))


def _wrap(module, split=0):
    channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    dim = -1 if isinstance(module, nn.Linear) else 1
    if not split:
        return wrap_layer(module, WeightQuantizer(module.weight.shape, WeightSpec()), ActQuantizer(1, ActivationSpec(), STATE, channels, dim))
    w = module.weight
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
    with pytest.raises(TypeError, match="only Linear, Conv1d and Conv2d"):
        wrap_layer(nn.ConvTranspose2d(2, 2, 2), None, None)


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
