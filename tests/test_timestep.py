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
