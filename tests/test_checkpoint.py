"""save -> load round trips and every bad checkpoint input."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import questdiff as qd
from questdiff import checkpoint

from questdiff.digest import file_digest, json_digest

from builders import ROTATED_W4A4, CustomUNet, custom_sampling_loop, ddim_pipeline, tiny_unet2d


@pytest.fixture(scope="module")
def calib():
    pipe = ddim_pipeline()
    return qd.collect_calibration(pipe, num_samples=4, calib_steps=4, num_inference_steps=8, progress=False)


@pytest.fixture
def saved(tmp_path, calib):
    unet = qd.quantize(tiny_unet2d(), "W4A4", calib, progress=False)
    qd.save(unet, tmp_path / "q")
    return unet, tmp_path / "q"


def test_save_load_bit_exact(saved, calib):
    unet, folder = saved
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "questdiff.json"}
    restored = qd.load(folder, base=tiny_unet2d())
    for key, value in unet.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    kwargs = calib.model_kwargs(torch.arange(4))
    with torch.no_grad():
        assert torch.equal(unet(**kwargs).sample, restored(**kwargs).sample)
    meta = json.loads((folder / "questdiff.json").read_text())
    assert meta["quant_config"]["name"] == "W4A4" and meta["method"] == "rtn"
    assert meta["format_version"] == checkpoint.FORMAT_VERSION and set(meta["digests"]) == {"weights", "config"}


def _reseal(folder, meta) -> None:
    """Rewrite questdiff.json with fresh digests, as a save of that content would (a legitimate checkpoint)."""
    meta["digests"] = {"weights": file_digest(folder / "model.safetensors")}
    meta["digests"]["config"] = json_digest({k: v for k, v in meta.items() if k != "digests"})
    (folder / "questdiff.json").write_text(json.dumps(meta))


def test_checkpoint_of_another_base_model(saved):
    other = tiny_unet2d()
    other.conv_in = torch.nn.Conv2d(1, 16, 5, padding=2)
    with pytest.raises(ValueError, match="another base model"):
        qd.load(saved[1], base=other)


def test_checkpoint_of_another_config_version(saved):
    folder = saved[1]
    meta = json.loads((folder / "questdiff.json").read_text())
    meta["format_version"] = 7
    (folder / "questdiff.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 7"):
        qd.load(folder, base=tiny_unet2d())
    meta["format_version"] = checkpoint.FORMAT_VERSION
    meta["quant_config"]["version"] = 3
    _reseal(folder, meta)
    with pytest.raises(ValueError, match="config version 3"):
        qd.load(folder, base=tiny_unet2d())


def test_truncated_or_corrupt_weights(saved):
    folder = saved[1]
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        qd.load(folder, base=tiny_unet2d())
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        qd.load(folder, base=tiny_unet2d())
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    _reseal(folder, json.loads((folder / "questdiff.json").read_text()))
    with pytest.raises(ValueError, match="does not match the model"):
        qd.load(folder, base=tiny_unet2d())


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a questdiff checkpoint"):
        qd.load(tmp_path, base=tiny_unet2d())


def test_output_folder_not_writable(tmp_path, saved):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        qd.save(saved[0], blocker / "out")


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    unet, folder = saved
    before = (folder / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        qd.save(unet, folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_quantizing_twice_is_refused(saved, calib):
    with pytest.raises(ValueError, match="already quantized"):
        qd.quantize(saved[0], "W8A8", calib, progress=False)


def test_bit_flip_in_weights_is_refused(saved):
    folder = saved[1]
    data = bytearray((folder / "model.safetensors").read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x40  # one bit of one tensor value; the file still parses
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt, or was changed after saving"):
        qd.load(folder, base=tiny_unet2d())


def test_hand_edited_config_is_refused(saved):
    folder = saved[1]
    meta = json.loads((folder / "questdiff.json").read_text())
    (folder / "questdiff.json").write_text(json.dumps(meta, indent=4, sort_keys=True))  # layout does not count
    qd.load(folder, base=tiny_unet2d())
    meta["quant_config"]["weight"]["bits"] = 2
    (folder / "questdiff.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(ValueError, match=r"questdiff.json was edited or corrupted after saving"):
        qd.load(folder, base=tiny_unet2d())
    del meta["digests"]
    meta["quant_config"]["weight"]["bits"] = 4
    (folder / "questdiff.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(ValueError, match=r"questdiff.json was edited or corrupted after saving"):
        qd.load(folder, base=tiny_unet2d())


def test_adapter_must_match_the_saved_one(saved, tmp_path):
    with pytest.raises(ValueError, match="was made with adapter"):
        qd.load(saved[1], base=tiny_unet2d(), adapter=qd.GenericAdapter("timestep"))
    model = CustomUNet().eval()
    with qd.record_calibration(model, timestep_argument="noise_level") as rec:
        custom_sampling_loop(model, n=2, steps=4)
    fresh = CustomUNet()
    fresh.load_state_dict(model.state_dict())
    qd.quantize(model, "W8A8", rec.result(), adapter=qd.GenericAdapter("noise_level"), progress=False)
    qd.save(model, tmp_path / "generic")
    with pytest.raises(ValueError, match=r"adapter \{'name': 'generic', 'timestep_argument': 'noise_level'"):
        qd.load(tmp_path / "generic", base=fresh, adapter=qd.GenericAdapter("x"))  # x: the sample argument
    restored = qd.load(tmp_path / "generic", base=fresh, adapter=qd.GenericAdapter("noise_level"))
    assert torch.equal(custom_sampling_loop(restored, n=2, steps=4), custom_sampling_loop(model, n=2, steps=4))


def test_rotated_model_round_trips_bit_exactly_and_the_base_is_rotated_once(tmp_path, calib):
    unet = qd.quantize(tiny_unet2d(), ROTATED_W4A4, calib, progress=False)
    qd.save(unet, tmp_path / "rot")
    restored = qd.load(tmp_path / "rot", base=tiny_unet2d())
    for key, value in unet.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    rotated = {n for n, m in restored.named_modules() if getattr(m, "rotation", None) is not None}
    assert rotated and rotated == {n for n, m in unet.named_modules() if getattr(m, "rotation", None) is not None}
    kwargs = calib.model_kwargs(torch.arange(4))
    with torch.no_grad():
        assert torch.equal(unet(**kwargs).sample, restored(**kwargs).sample)
        with qd.quant_state(restored, weight=False, act=False):  # the loaded weights pair with ONE input rotation
            torch.testing.assert_close(restored(**kwargs).sample, tiny_unet2d()(**kwargs).sample, atol=1e-5, rtol=1e-5)


def test_refused_save_leaves_the_checkpoint_there_intact(saved, calib, tmp_path):
    """Issue 20 item 2: a model that is not quantized, or a deployed one, is refused before anything is written;
    a deployed model is sent to ``save_deployed``, and neither kind of checkpoint is written into the other's folder."""
    unet, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="is not quantized"):
        qd.save(tiny_unet2d(), folder)
    deployed = qd.convert(qd.quantize(tiny_unet2d(), "W8A8", calib, progress=False))
    with pytest.raises(ValueError, match="the model is deployed .*save it with questdiff.save_deployed"):
        qd.save(deployed, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    qd.load(folder, base=tiny_unet2d())  # still the checkpoint that was saved

    qd.save_deployed(deployed, tmp_path / "deployed")
    with pytest.raises(ValueError, match="holds a deployed checkpoint .*save the fake-quant model into another folder"):
        qd.save(unet, tmp_path / "deployed")
    with pytest.raises(ValueError, match="holds a fake-quant checkpoint .*save the deployed model into another folder"):
        qd.save_deployed(deployed, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "deployed").iterdir()) == ["deployed.safetensors", "questdiff-deployed.json"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_into_a_half_precision_base_runs_in_its_dtype(dtype, calib, tmp_path):
    """Issue 20 item 4: ``load(path, base=unet.to(dtype))`` returns a model whose forward runs in ``dtype``; the
    quantizer state (scales, zero points, rounding) stays fp32, and the output is that of the fp32 quantized model
    on the same half-rounded weights and inputs up to half-precision arithmetic: much closer to it than the FP
    model is (so quantization does run in half precision)."""
    fp = tiny_unet2d()
    qd.save(qd.quantize(copy.deepcopy(fp), "W4A8", calib, progress=False), tmp_path / "q")
    half = qd.load(tmp_path / "q", base=copy.deepcopy(fp).to(dtype))
    reference = qd.load(tmp_path / "q", base=copy.deepcopy(fp).to(dtype).float())
    assert {v.dtype for k, v in half.state_dict().items() if "_quantizer." in k and v.is_floating_point()} == {torch.float32}
    kwargs = calib.model_kwargs(torch.arange(4))
    sample = kwargs.pop("sample").to(dtype)
    with torch.no_grad():
        out = half(sample, **kwargs).sample
        expected = reference(sample.float(), **kwargs).sample
        full_precision = fp(sample.float(), **kwargs).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    gap = float((out.float() - expected).norm() / expected.norm())
    assert gap < 0.5 * float((full_precision - expected).norm() / expected.norm()), gap
