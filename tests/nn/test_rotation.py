"""Input-channel rotation: R is orthogonal and reproducible, a rotated layer computes the float output of the
unrotated one, and a rotated 4-bit per-tensor activation grid loses less than the unrotated one on outlier channels."""
import pytest
import torch
from torch import nn

from questdiff.config import ActivationSpec, WeightSpec
from questdiff.nn import ActQuantizer, WeightQuantizer, wrap_layer
from questdiff.nn.layers import quant_layout
from questdiff.nn.rotation import ChannelRotation, hadamard
from questdiff.primitives import search_minmax
from questdiff.timestep import TimestepSchedule, TimestepState

STATE = TimestepState(TimestepSchedule((500.0,)))


def _matrix(rotation: ChannelRotation) -> torch.Tensor:
    """R itself: the rotation of the identity's rows."""
    return rotation.rotate(torch.eye(rotation.channels), -1)


def test_rotation_is_orthogonal_block_diagonal_and_reproducible():
    r = _matrix(ChannelRotation(16, 4, dim=-1))
    torch.testing.assert_close(r @ r.T, torch.eye(16), atol=1e-6, rtol=0)
    assert not r[:4, 4:].any() and not r[4:, :4].any()  # blocks of 4 never mix
    assert torch.equal(r, _matrix(ChannelRotation(16, 4, dim=-1)))  # rebuilt from (channels, block, seed)
    assert not torch.equal(r, _matrix(ChannelRotation(16, 4, dim=-1, seed=1)))
    assert torch.equal(hadamard(4) @ hadamard(4), 4 * torch.eye(4))


def test_bad_rotation_sizes_fail_naming_the_problem():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)
    with pytest.raises(ValueError, match="not a multiple"):
        ChannelRotation(12, 8, dim=1)


def _wrap(module, split=0, spec=ActivationSpec()):
    channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    dim = -1 if isinstance(module, nn.Linear) else 1
    w = quant_layout(module, module.weight)
    if not split:
        return wrap_layer(module, WeightQuantizer(w.shape, WeightSpec()), ActQuantizer(1, spec, STATE, channels, dim))
    return wrap_layer(
        module, WeightQuantizer(w[:, :split].shape, WeightSpec()), ActQuantizer(1, spec, STATE, split, dim), split,
        WeightQuantizer(w[:, split:].shape, WeightSpec()), ActQuantizer(1, spec, STATE, channels - split, dim),
    )


@pytest.mark.parametrize("module, shape, split", [
    (nn.Linear(16, 5), (3, 4, 16), 0),
    (nn.Conv2d(16, 6, 3, padding=1), (2, 16, 6, 6), 0),
    (nn.Conv2d(16, 6, 3, padding=1, padding_mode="reflect"), (2, 16, 6, 6), 0),
    (nn.Conv2d(16, 6, 1), (2, 16, 5, 5), 8),
    (nn.Conv1d(8, 6, 3, padding=1), (2, 8, 9), 0),
    (nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), (2, 8, 5, 5), 0),
])
def test_rotated_layer_keeps_the_float_output(module, shape, split):
    x = torch.randn(shape)
    before = module.weight.detach().clone()
    with torch.no_grad():
        ref = module(x)
        q = _wrap(module, split)
        q.rotate_inputs(ChannelRotation(shape[-1] if isinstance(module, nn.Linear) else shape[1], 8,
                                        -1 if isinstance(module, nn.Linear) else 1))
        q.set_quant_state(False, False)
        torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)
    assert q.weight is module.weight and not torch.allclose(q.weight, before)  # rotated in place, still shared
    with pytest.raises(ValueError, match="already rotated"):
        q.rotate_inputs(ChannelRotation(q.rotation.channels, 8, q.rotation.dim))


def _quantized_output_error(layer, x: torch.Tensor) -> float:
    """Output MSE of ``layer`` with only its 4-bit per-tensor activation quantizer on, min-max range of ``x``'s
    quantizer input."""
    with torch.no_grad():
        layer.set_quant_state(False, False)
        ref = layer(x)
        seen = layer.quantize_input(x)  # disabled: what the quantizer receives
        scale, zero = search_minmax(seen, 4, False)
        layer.act_quantizer.set_row(0, scale, zero)
        layer.set_quant_state(False, True)
        return float(((layer(x) - ref) ** 2).mean())


def test_rotation_lowers_the_per_tensor_4_bit_error_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 40]] *= 10  # two outlier channels (as in diffusion UNet activations) stretch the per-tensor range
    base = nn.Linear(64, 32)
    spec = ActivationSpec(bits=4, rotation=64)
    plain = _wrap(nn.Linear(64, 32), spec=spec)
    plain.load_state_dict(base.state_dict(), strict=False)
    rotated = _wrap(base, spec=spec)
    rotated.rotate_inputs(ChannelRotation(64, 64, -1))
    assert not plain.act_quantizer.per_channel and not rotated.act_quantizer.per_channel
    assert _quantized_output_error(rotated, x) < 0.2 * _quantized_output_error(plain, x)


def test_rotated_layer_deep_copies_and_moves():
    import copy

    q = _wrap(nn.Linear(16, 4))
    q.rotate_inputs(ChannelRotation(16, 8, -1))
    twin = copy.deepcopy(q).to(torch.float64)
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(x.double()).float(), q(x), atol=1e-5, rtol=1e-5)
    assert twin.rotation is not q.rotation and twin.rotation.signs.dtype == torch.float64
    assert "rotation.signs" not in q.state_dict()  # rebuilt from (channels, block, seed): not in checkpoints
