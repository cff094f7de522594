import pytest
import torch

from questdiff.timestep import TimestepError, TimestepSchedule, TimestepState

KEYS = (951.0, 901.0, 851.0, 801.0)


def test_at_or_before_rule():
    s = TimestepSchedule(KEYS)
    assert s.index(951) == 0 and s.index(900) == 1 and s.index(901) == 1
    assert s.index(990) == 0  # before the first calibrated step, within one gap
    assert s.index(760) == 3  # after the last, within one gap
    assert s.index(852) == 1  # between keys -> the most recent calibrated step in sampling order


def test_nearest_rule():
    s = TimestepSchedule(KEYS, "nearest")
    assert s.index(920) == 1 and s.index(930) == 0


def test_out_of_range_error_names_range():
    with pytest.raises(TimestepError, match=r"outside the calibrated range .*801, 951"):
        TimestepSchedule(KEYS).index(100)


def test_batches_must_map_to_one_row():
    s = TimestepSchedule(KEYS)
    assert s.index_of_batch(torch.tensor([901, 901])) == 1
    assert s.index_of_batch(torch.tensor(851)) == 2
    with pytest.raises(TimestepError, match="different quantizer rows"):
        s.index_of_batch(torch.tensor([951, 801]))


def test_state_takes_per_sample_rows_for_mixed_batches():
    state = TimestepState(TimestepSchedule(KEYS))
    with state.at_timestep(torch.tensor([951, 801, 951])):
        assert state.index is None and state.rows.tolist() == [0, 3, 0]
        with pytest.raises(TimestepError, match="mixes timesteps"):
            state.require_index()
        with state.at_index(2):
            assert state.rows is None and state.require_index() == 2
        assert state.rows is not None
    assert state.rows is None and state.index is None
    assert state.set_timestep(torch.tensor([901, 901])) == 1 and state.rows is None


def test_single_set_maps_everything_to_row_zero():
    s = TimestepSchedule((500.0,))
    assert s.index(0) == 0 and s.index(999) == 0


def test_state_context_and_missing_timestep():
    state = TimestepState(TimestepSchedule(KEYS))
    with pytest.raises(TimestepError, match="no timestep is active"):
        state.require_index()
    with state.at_timestep(851):
        assert state.require_index() == 2
    assert state.index is None


def test_schedule_validation_and_roundtrip():
    with pytest.raises(ValueError):
        TimestepSchedule(())
    with pytest.raises(ValueError, match="distinct"):
        TimestepSchedule((1.0, 1.0))
    s = TimestepSchedule(KEYS, "nearest")
    assert TimestepSchedule.from_dict(s.to_dict()) == s


# -- the hook reaches the state through the model it is called on (DESIGN §3) ---------------------------------------
@pytest.fixture(scope="module")
def quantized_unet():
    import questdiff as qd
    from questdiff.calibration import CalibrationSet

    from builders import tiny_unet2d

    timesteps = torch.tensor([900.0, 600.0, 300.0, 50.0]).repeat_interleave(4)
    calib = CalibrationSet(
        {"sample": torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)), "timestep": timesteps},
        torch.arange(4).repeat_interleave(4), "sample", "timestep",
    )
    return qd.quantize(tiny_unet2d(), "W4A8", calib, progress=False)


def _run(model, t: int) -> torch.Tensor:
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x, torch.tensor(t)).sample


def test_deepcopy_routes_its_own_timestep(quantized_unet):
    import copy

    _run(quantized_unet, 900)  # leaves row 0 active on the original
    clone = copy.deepcopy(quantized_unet)
    _run(quantized_unet, 900)
    out = _run(clone, 50)
    reference = _run(quantized_unet, 50)
    assert not torch.equal(reference, _run(quantized_unet, 900))  # rows differ, so a stale row would show
    assert torch.equal(out, reference)


def test_pickled_and_ema_copies_route_their_own_timestep(quantized_unet):
    import copy
    import io

    import questdiff as qd

    _run(quantized_unet, 900)
    buffer = io.BytesIO()
    torch.save(quantized_unet, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    ema = copy.deepcopy(quantized_unet)
    ema.load_state_dict(quantized_unet.state_dict())
    _run(quantized_unet, 900)
    reference = _run(quantized_unet, 50)
    assert torch.equal(_run(restored, 50), reference)
    assert torch.equal(_run(ema, 50), reference)
    moved = copy.deepcopy(quantized_unet).to(torch.float64)
    _run(quantized_unet, 900)
    with torch.no_grad():
        out = moved(torch.zeros(1, 1, 16, 16, dtype=torch.float64), torch.tensor(50)).sample
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert qd.handle(moved).state.index == 3 and qd.handle(quantized_unet).state.index == 0


def test_coverage_warning_names_unvisited_and_outside_timesteps():
    s = TimestepSchedule(KEYS, recorded=(951.0, 926.0, 901.0, 876.0, 851.0, 826.0, 801.0))
    assert s.coverage_warning(torch.tensor([951, 926])) is None and s.coverage_warning(826) is None
    assert "outside the calibrated span [801, 951]" in s.coverage_warning(990.0)
    message = s.coverage_warning([951.0, 913.5])
    assert "913.5 that the calibration trajectories never visited" in message and "--scheduler" in message
    assert TimestepSchedule(KEYS).coverage_warning(913.5) is None  # old schedules: visited steps unknown
    assert TimestepSchedule((951.0,), recorded=KEYS).coverage_warning(801) is None  # one shared row: all recorded
    assert TimestepSchedule.from_dict(s.to_dict()) == s and "recorded" not in TimestepSchedule(KEYS).to_dict()


def test_state_warns_once_per_denoiser():
    state = TimestepState(TimestepSchedule(KEYS, recorded=KEYS))
    with pytest.warns(UserWarning, match="never visited") as caught:
        for t in (951, 913, 888, 801):
            state.set_timestep(torch.tensor(t))
    assert len(caught) == 1 and state.index == 3
