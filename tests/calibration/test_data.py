import pytest
import torch
from torch import nn

import questdiff as qd
from questdiff.calibration import CalibrationSet

from builders import CustomUNet, custom_sampling_loop, ddim_pipeline, tiny_cond_unet, tiny_unet2d


@pytest.fixture(scope="module")
def calib():
    return qd.collect_calibration(ddim_pipeline(), num_samples=6, num_inference_steps=10, batch_size=4, progress=False)


def test_records_every_step_of_every_trajectory(calib):
    assert len(calib) == 6 * 10 and calib.xs.shape == (60, 1, 16, 16)
    assert sorted(set(calib.steps.tolist())) == list(range(10))
    assert calib.timesteps == sorted(calib.timesteps, reverse=True)  # noisiest first
    assert calib.timestep_is_int and calib.static == {}  # DDIMPipeline passes (sample, t) only


def test_select_stride_and_samples_per_step(calib):
    sub = calib.select(calib_steps=5, samples_per_step=3)
    assert sorted(set(sub.steps.tolist())) == [0, 2, 4, 6, 8] and len(sub) == 15
    with pytest.raises(ValueError, match="only 10 sampler steps"):
        calib.select(calib_steps=11)


def test_collect_with_stride_stores_only_kept_steps():
    calib = qd.collect_calibration(ddim_pipeline(), num_samples=3, calib_steps=5, num_inference_steps=10, batch_size=2, progress=False)
    assert sorted(set(calib.steps.tolist())) == [0, 2, 4, 6, 8] and len(calib) == 15


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
