import numpy as np
import pytest
import torch
from torch import nn

import questdiff as qd
from questdiff.calibration import CalibrationSet
from questdiff.calibration.data import spread_steps

from builders import CustomUNet, custom_sampling_loop, ddim_pipeline, tiny_cond_unet, tiny_unet2d


@pytest.fixture(scope="module")
def calib():
    return qd.collect_calibration(ddim_pipeline(), num_samples=6, num_inference_steps=10, batch_size=4, progress=False)


def test_records_every_step_of_every_trajectory(calib):
    assert len(calib) == 6 * 10 and calib.xs.shape == (60, 1, 16, 16)
    assert sorted(set(calib.steps.tolist())) == list(range(10))
    assert calib.timesteps == sorted(calib.timesteps, reverse=True)  # noisiest first
    assert calib.timestep_is_int and calib.static == {}  # DDIMPipeline passes (sample, t) only


def test_spread_steps_span_the_trajectory():
    for n in range(1, 60):
        for k in range(1, n + 1):
            steps = spread_steps(n, k)
            assert len(steps) == k and steps == sorted(set(steps)) and steps[0] == 0
            if k > 1:  # the last step is kept and the gaps differ by at most one
                gaps = {b - a for a, b in zip(steps, steps[1:])}
                assert steps[-1] == n - 1 and max(gaps) - min(gaps) <= 1
    assert spread_steps(10, 5) == [0, 2, 5, 7, 9] and spread_steps(20, 20) == list(range(20))
    with pytest.raises(ValueError, match="between 1 and the 10 sampler steps"):
        spread_steps(10, 0)


def test_select_spread_and_samples_per_step(calib):
    sub = calib.select(calib_steps=5, samples_per_step=3)
    assert sorted(set(sub.steps.tolist())) == spread_steps(10, 5) and len(sub) == 15
    with pytest.raises(ValueError, match="only 10 sampler steps"):
        calib.select(calib_steps=11)


def test_select_keeps_the_other_steps_for_ranges_only(calib, tmp_path):
    sub = calib.select(calib_steps=4, samples_per_step=3)
    others = sorted(set(range(10)) - set(spread_steps(10, 4)))
    assert sorted(set(sub.steps.tolist())) == spread_steps(10, 4) and len(sub) == 12
    assert sorted(set(sub.range_steps.steps.tolist())) == others and len(sub.range_steps) == 3 * len(others)
    assert sub.timesteps == [t for t in calib.timesteps if t not in sub.range_steps.timesteps]
    assert sub.recorded_timesteps == calib.timesteps
    # the calibrated rows are those of a selection without range steps, which has another digest
    plain = calib.select(calib_steps=4, samples_per_step=3, keep_range_steps=False)
    assert plain.range_steps is None and torch.equal(plain.xs, sub.xs) and plain.digest() != sub.digest()
    # selecting again keeps the earlier range steps; subsets and single timesteps drop them
    again = sub.select(calib_steps=2)
    assert len(again.range_steps) == len(sub.range_steps) + 3 * 2 and sub.at_timestep(sub.timesteps[0]).range_steps is None
    loaded = CalibrationSet.load(sub.save(tmp_path / "calib.safetensors"))
    assert loaded.digest() == sub.digest() and torch.equal(loaded.range_steps.xs, sub.range_steps.xs)
    joined = CalibrationSet.concat([sub, plain, sub])
    assert len(joined.range_steps) == 2 * len(sub.range_steps)


def test_collect_with_spread_keeps_range_steps_of_the_first_trajectories():
    pipe = ddim_pipeline()
    calib = qd.collect_calibration(pipe, num_samples=3, calib_steps=5, num_inference_steps=10, batch_size=2,
                                   range_samples=2, progress=False)
    assert sorted(set(calib.steps.tolist())) == spread_steps(10, 5) and len(calib) == 15
    assert sorted(set(calib.range_steps.steps.tolist())) == sorted(set(range(10)) - set(spread_steps(10, 5)))
    assert len(calib.range_steps) == 2 * 5  # the first batch of 2 trajectories only
    assert calib.range_steps.timesteps == [t for t in calib.recorded_timesteps if t not in calib.timesteps]
    none = qd.collect_calibration(pipe, num_samples=3, calib_steps=5, num_inference_steps=10, batch_size=2,
                                  range_samples=0, progress=False)
    assert none.range_steps is None and torch.equal(none.xs, calib.xs)


def test_selected_steps_cover_the_same_sampler():
    """The README's generic recipe: 20 of 50 recorded steps, then sampling with the same 50-step sampler."""
    model = CustomUNet().eval()
    with qd.record_calibration(model, timestep_argument="noise_level") as rec:
        custom_sampling_loop(model, n=2, steps=50)
    calib = rec.result().select(calib_steps=20)
    qd.quantize(model, "W8A8", calib, adapter=qd.GenericAdapter("noise_level"), progress=False)
    assert torch.isfinite(custom_sampling_loop(model, n=2, steps=50)).all()


def test_collected_steps_cover_the_same_sampler():
    """``questdiff quantize --calib-steps 8`` on a 20-step sampler, then ``questdiff sample`` with that sampler."""
    pipe = ddim_pipeline()
    calib = qd.collect_calibration(pipe, num_samples=2, calib_steps=8, num_inference_steps=20, progress=False)
    qd.quantize(pipe.unet, "W8A8", calib, progress=False)
    images = pipe(batch_size=1, num_inference_steps=20, output_type="np").images
    assert np.isfinite(images).all()


def test_save_load_roundtrip(calib, tmp_path):
    path = calib.save(tmp_path / "calib.safetensors")
    loaded = CalibrationSet.load(path)
    assert loaded.timesteps == calib.timesteps and loaded.static == calib.static
    for key in calib.inputs:
        assert torch.equal(loaded.inputs[key], calib.inputs[key])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CalibrationSet.load(path)


def test_nan_and_wrong_shapes_rejected(calib):
    bad = calib.subset(torch.arange(4))
    bad.inputs["sample"] = bad.inputs["sample"].clone()
    bad.inputs["sample"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qd.quantize(tiny_unet2d(), "W8A8", bad, progress=False)
    with pytest.raises(ValueError, match="channels but the model expects 4"):
        qd.quantize(tiny_cond_unet(), "W8A8", calib, progress=False)


def test_conditioning_width_mismatch():
    unet = tiny_cond_unet()
    rows = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([500.0, 500.0]), "encoder_hidden_states": torch.randn(2, 3, 16)}
    calib = CalibrationSet(rows, torch.zeros(2, dtype=torch.long), "sample", "timestep")
    with pytest.raises(ValueError, match="cross-attends to width 32"):
        qd.quantize(unet, "W8A8", calib, progress=False)


def test_generic_adapter_with_missing_timestep_argument():
    model = CustomUNet()
    with qd.record_calibration(model, timestep_argument="noise_level") as rec:
        custom_sampling_loop(model, n=2, steps=4)
    with pytest.raises(ValueError, match="has no argument 't'"):
        qd.quantize(model, "W8A8", rec.result(), adapter=qd.GenericAdapter("t"), progress=False)
    with pytest.raises(ValueError, match="no argument 'sigma'"):
        with qd.record_calibration(model, timestep_argument="sigma"):
            pass


def test_denoiser_without_quantizable_layers():
    class NoLayers(nn.Module):
        def forward(self, x, t):
            return x * 0.5

    model = NoLayers()
    with qd.record_calibration(model, timestep_argument="t") as rec:
        model(torch.randn(2, 1, 4, 4), torch.tensor(10))
    with pytest.raises(ValueError, match="no Linear/Conv1d/Conv2d layer"):
        qd.quantize(model, "W8A8", rec.result(), adapter=qd.GenericAdapter("t"), progress=False)


def test_nothing_recorded():
    with qd.record_calibration(tiny_unet2d()) as rec:
        pass
    with pytest.raises(ValueError, match="no denoiser call was recorded"):
        rec.result()


def test_unknown_method_and_missing_calibration(calib):
    with pytest.raises(ValueError, match="unknown quantization method"):
        qd.quantize(tiny_unet2d(), "W8A8", calib, method="magic", progress=False)
    with pytest.raises(ValueError, match="collect_calibration"):
        qd.quantize(tiny_unet2d(), "W8A8", None)


class _TokenModel(nn.Module):
    """FLUX-like call signature: token inputs ``[B, S, C]`` plus batch-less position ids ``[S, 2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states, timestep, ids, context=None):
        return self.proj(hidden_states + ids.float().sum(-1, keepdim=True) + timestep[:, None, None])


def _token_calls(model, ids, batches=(3, 3, 2)):
    with qd.record_calibration(model, timestep_argument="timestep") as rec:
        for batch in batches:
            for t in (1.0, 0.5):
                model(torch.randn(batch, 5, 4), torch.full((batch,), t), ids, context=torch.randn(batch, 2, 4))
    return rec


def test_batchless_tensor_arguments_are_recorded_once_as_constants(tmp_path):
    model, ids = _TokenModel(), torch.arange(10).reshape(5, 2)
    calib = _token_calls(model, ids).result()
    assert set(calib.inputs) == {"hidden_states", "timestep", "context"} and len(calib) == 16
    assert torch.equal(calib.constants["ids"], ids) and not calib.timestep_is_int
    kwargs = calib.model_kwargs(torch.tensor([0, 7]))
    assert torch.equal(kwargs["ids"], ids) and kwargs["hidden_states"].shape == (2, 5, 4)
    sub = calib.subset(torch.arange(4))
    loaded = CalibrationSet.load(sub.save(tmp_path / "c.safetensors"))
    assert torch.equal(loaded.constants["ids"], ids) and loaded.digest() == sub.digest()
    qd.quantize(model, "W8A8", calib, adapter=qd.GenericAdapter("timestep"), progress=False)  # token channels = 4
    other = _TokenModel()
    with pytest.raises(ValueError, match="'ids' has no batch dimension .* changed between calls"):
        with qd.record_calibration(other, timestep_argument="timestep"):
            other(torch.randn(3, 5, 4), torch.ones(3), ids)
            other(torch.randn(3, 5, 4), torch.ones(3), ids + 1)


def test_digest_does_not_depend_on_argument_order(tmp_path):
    rows = {"sample": torch.randn(2, 4), "timestep": torch.tensor([3.0, 3.0]), "encoder_hidden_states": torch.randn(2, 3)}
    calib = CalibrationSet(rows, torch.zeros(2, dtype=torch.long), "sample", "timestep")
    loaded = CalibrationSet.load(calib.save(tmp_path / "c.safetensors"))  # keys come back sorted
    assert list(loaded.inputs) != list(calib.inputs) and loaded.digest() == calib.digest()


def test_caption_width_of_models_that_project_captions():
    """PixArt takes T5 captions of width ``caption_channels`` and projects them to ``cross_attention_dim``."""

    class Config(dict):
        __getattr__ = dict.get

    model = nn.Linear(1, 1)
    model.config = Config(in_channels=4, cross_attention_dim=16, caption_channels=12)
    model.forward = lambda hidden_states, timestep, encoder_hidden_states: None
    rows = {"hidden_states": torch.randn(2, 4, 4, 4), "timestep": torch.tensor([3.0, 3.0]),
            "encoder_hidden_states": torch.randn(2, 3, 12)}
    CalibrationSet(rows, torch.zeros(2, dtype=torch.long), "hidden_states", "timestep").validate(model)
    rows["encoder_hidden_states"] = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="cross-attends to width 12"):
        CalibrationSet(rows, torch.zeros(2, dtype=torch.long), "hidden_states", "timestep").validate(model)


class ColumnTimestepNet(nn.Module):
    """A denoiser that takes its timestep as a column ``[N, 1]`` (fed straight into a Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.time = nn.Linear(1, 4)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x) + self.time(t / 1000)[:, :, None, None]))


def test_replays_the_timestep_layout_it_recorded(tmp_path):
    model = ColumnTimestepNet()
    with qd.record_calibration(model, timestep_argument="t") as rec:
        for t in (900.0, 500.0, 100.0):
            model(torch.randn(3, 1, 8, 8), torch.full((3, 1), t))
    calib = rec.result()
    assert calib.timestep_shape == (-1, 1) and calib.ts.shape == (9,)
    assert calib.model_kwargs(torch.tensor([0, 4, 8]))["t"].tolist() == [[900], [500], [100]]
    assert CalibrationSet.load(calib.save(tmp_path / "c.safetensors")).timestep_shape == (-1, 1)
    qd.quantize(model, "W8A8", calib, adapter=qd.GenericAdapter("t"), progress=False)  # replays [N, 1]


def test_replays_a_scalar_timestep_as_a_scalar(calib):
    assert calib.timestep_shape == ()  # DDIMPipeline passes a 0-dim t
    one_step = torch.nonzero(calib.steps == 3).flatten()
    assert calib.model_kwargs(one_step)["timestep"].shape == ()
    mixed = calib.model_kwargs(torch.tensor([0, 1, 11]))["timestep"]  # rows of two steps cannot share one value
    assert mixed.shape == (3,) and mixed.tolist() == calib.ts[[0, 1, 11]].long().tolist()


def test_timestep_layout_must_not_change():
    model = ColumnTimestepNet()
    with qd.record_calibration(model, timestep_argument="t") as rec:
        model(torch.randn(2, 1, 8, 8), torch.full((2, 1), 900.0))
        model(torch.randn(1, 1, 8, 8), torch.full((1, 1), 800.0))  # a batch of one agrees with either layout
        with pytest.raises(ValueError, match=r"changed layout between calls \(\(-1, 1\) -> \(\), -1 = batch\)"):
            model(torch.randn(2, 1, 8, 8), torch.tensor(700.0))
    assert rec.result().timestep_shape == (-1, 1)


def test_digest_ignores_key_order(tmp_path):
    rows = {"sample": torch.randn(4, 1, 4, 4), "timestep": torch.tensor([9.0, 9.0, 5.0, 5.0]),
            "encoder_hidden_states": torch.randn(4, 1, 8)}
    steps = torch.tensor([0, 0, 1, 1])
    recorded = CalibrationSet(rows, steps, "sample", "timestep")
    reordered = CalibrationSet(dict(reversed(list(rows.items()))), steps, "sample", "timestep")
    loaded = CalibrationSet.load(recorded.save(tmp_path / "c.safetensors"))
    assert list(loaded.inputs) != list(recorded.inputs)  # safetensors hands the keys back sorted
    assert recorded.digest() == reordered.digest() == loaded.digest()
    changed = CalibrationSet({**rows, "encoder_hidden_states": rows["encoder_hidden_states"] + 1}, steps, "sample", "timestep")
    assert changed.digest() != recorded.digest()
