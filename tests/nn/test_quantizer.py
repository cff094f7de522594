import pytest
import torch

from questdiff.config import ActivationSpec, WeightSpec
from questdiff.nn import ActQuantizer, WeightQuantizer
from questdiff.timestep import TimestepError, TimestepSchedule, TimestepState


def _state(rows=3):
    return TimestepState(TimestepSchedule(tuple(float(900 - 100 * i) for i in range(rows))))


def test_act_quantizer_registers_one_T_by_C_parameter():
    q = ActQuantizer(3, ActivationSpec(bits=4), _state(), channels=5, channel_dim=1)
    params = dict(q.named_parameters())
    assert list(params) == ["scale"] and params["scale"].shape == (3, 5)
    assert set(q.state_dict()) == {"scale", "zero_point"}


def test_gradients_reach_only_active_row():
    state = _state()
    q = ActQuantizer(3, ActivationSpec(bits=8), state, channels=4, channel_dim=1)
    q.set_row(1, torch.full((1,), 0.05), torch.zeros(1))
    with state.at_index(1):
        q(torch.randn(2, 4, 3, 3)).square().sum().backward()
    grad = q.scale.grad
    assert grad[1].abs().sum() > 0
    assert torch.count_nonzero(grad[0]) == 0 and torch.count_nonzero(grad[2]) == 0


def test_rows_select_different_scales():
    state = _state(2)
    q = ActQuantizer(2, ActivationSpec(bits=8), state)
    q.set_row(0, torch.tensor(1.0), torch.tensor(0.0))
    q.set_row(1, torch.tensor(0.01), torch.tensor(0.0))
    x = torch.tensor([0.3, 0.62])
    with state.at_index(0):
        coarse = q(x)
    with state.at_index(1):
        fine = q(x)
    assert torch.equal(coarse, torch.tensor([0.0, 1.0])) and torch.allclose(fine, x)


def test_mixed_batch_takes_each_samples_row_and_repeats_it_over_folded_heads():
    state = _state()
    q = ActQuantizer(3, ActivationSpec(bits=4), state, channels=4, channel_dim=-1)
    for row in range(3):
        q.set_row(row, torch.full((4,), 0.1 * (row + 1)), torch.zeros(4))
    x = torch.randn(6, 5, 4, requires_grad=True)  # batch 3 x 2 heads folded sample-major
    with state.at_timestep(torch.tensor([900.0, 700.0, 800.0])):
        mixed = q(x)
    rows = [0, 0, 2, 2, 1, 1]
    for i, row in enumerate(rows):
        with state.at_index(row):
            assert torch.equal(mixed[i], q(x[i : i + 1])[0])
    mixed.square().sum().backward()
    assert all(q.scale.grad[r].abs().sum() > 0 for r in range(3))
    with state.at_timestep(torch.tensor([900.0, 700.0, 800.0, 700.0])), pytest.raises(TimestepError, match="multiple"):
        q(x)


def test_disabled_quantizers_are_identity():
    x = torch.randn(4, 6)
    q = ActQuantizer(1, ActivationSpec(bits=2), _state(1), channels=6, channel_dim=-1)
    q.enabled = False
    assert q(x) is x
    w = WeightQuantizer(x.shape, WeightSpec(bits=2))
    w.enabled = False
    assert w(x) is x


def test_weight_quantizer_granularities():
    w = torch.randn(6, 8, 3, 3)
    assert WeightQuantizer(w.shape, WeightSpec()).scale.shape == (6, 1, 1, 1)
    assert WeightQuantizer(w.shape, WeightSpec(granularity="tensor")).scale.shape == (1, 1, 1, 1)
    g = WeightQuantizer(w.shape, WeightSpec(bits=4, granularity="group", group_size=24))
    assert g.scale.shape == (6, 3, 1)
    g.set_qparams(torch.full((6, 3, 1), 0.1), torch.full((6, 3, 1), 8.0))
    out = g(w)
    assert out.shape == w.shape
    assert torch.allclose(torch.round(out / 0.1), out / 0.1, atol=1e-4)


def test_weight_quantizer_ste_gradient():
    w = torch.randn(4, 5, requires_grad=True)
    q = WeightQuantizer(w.shape, WeightSpec(bits=8))
    q.set_qparams(torch.full((4, 1), 0.05), torch.full((4, 1), 128.0))
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
