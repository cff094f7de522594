"""Deployed checkpoints: bit-exact round trip without the FP base, packed sizes, and integrity checks."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import questdiff as qd
from builders import ROTATED_W4A4, SMOOTHED_ROTATED_W4A4, tiny_unet2d
from questdiff.deploy import DeployedLayer
from questdiff.deploy.checkpoint import CONFIG_NAME, WEIGHTS_NAME


@pytest.mark.parametrize("preset", ["W8A8", ROTATED_W4A4, SMOOTHED_ROTATED_W4A4],
                         ids=["W8A8", "W4A4-rot8", "W4A4-smooth-rot8"])
def test_round_trip_is_bit_exact_without_the_base_model(arch, preset, deployed_pair, inputs, tmp_path):
    _, deployed = deployed_pair(arch, preset)
    qd.save_deployed(deployed, tmp_path)
    loaded = qd.load_deployed(tmp_path)  # rebuilt from the class and config alone
    x, kwargs = inputs(deployed)
    for t in (900, 100):
        with torch.no_grad():
            assert torch.equal(loaded(x, torch.tensor(t), **kwargs).sample, deployed(x, torch.tensor(t), **kwargs).sample)
    saved = {k: v for k, v in deployed.state_dict().items()}
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    for transform in ("rotation", "smoothing"):
        specs = {n: getattr(m, transform).spec() for n, m in loaded.named_modules()
                 if isinstance(m, DeployedLayer) and getattr(m, transform) is not None}
        assert specs == {n: getattr(m, transform).spec() for n, m in deployed.named_modules()
                         if isinstance(m, DeployedLayer) and getattr(m, transform) is not None}
        assert bool(specs) == (getattr(getattr(preset, "activation", None), transform, None) is not None)


@pytest.mark.parametrize("preset,ratio", [("W8A8", 0.27), ("W4A8", 0.15)])
def test_quantized_layers_are_packed(deployed_pair, preset, ratio):
    _, deployed = deployed_pair(tiny_unet2d, preset)
    layers = [m for m in deployed.modules() if isinstance(m, DeployedLayer)]
    stored = sum(t.numel() * t.element_size() for m in layers for t in m.buffers())
    fp32 = sum(4 * (m.out_channels if hasattr(m, "out_channels") else m.out_features)
               * (m.in_channels * m.kernel_size[0] * m.kernel_size[-1] if hasattr(m, "in_channels") else m.in_features)
               for m in layers)
    assert stored <= ratio * fp32 * 1.3  # tiny layers pay proportionally more for their scales and bias


def test_corrupt_or_edited_files_are_refused(deployed_pair, tmp_path):
    _, deployed = deployed_pair(tiny_unet2d, "W8A8")
    qd.save_deployed(deployed, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or was modified"):
        qd.load_deployed(tmp_path)
    qd.save_deployed(deployed, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["quant_config"]["weight"]["bits"] = 2
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="modified after it was written"):
        qd.load_deployed(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a deployed questdiff checkpoint"):
        qd.load_deployed(tmp_path / "missing")


def test_save_deployed_needs_a_converted_model(make_quantized, tmp_path):
    with pytest.raises(ValueError, match="run questdiff.convert"):
        qd.save_deployed(make_quantized(tiny_unet2d, "W8A8"), tmp_path)


class Denoiser(nn.Module):
    """A non-diffusers denoiser: no config to rebuild it from."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        h = torch.relu(self.inp(x)) + t.float().view(-1, 1, 1, 1) / 1000
        h = self.mid(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.out(h)


def test_foreign_denoiser_loads_onto_a_skeleton(tmp_path):
    model = Denoiser()
    with qd.record_calibration(model, "t") as rec:
        for t in (900, 100):
            model(torch.randn(2, 1, 8, 8), torch.full((2,), t))
    qd.quantize(model, "W8A8", rec.result(), adapter=qd.GenericAdapter("t"), progress=False)
    qd.convert(model)
    qd.save_deployed(model, tmp_path)
    with pytest.raises(ValueError, match="pass model="):
        qd.load_deployed(tmp_path)
    loaded = qd.load_deployed(tmp_path, model=Denoiser())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.full((2,), 100)), model(x, torch.full((2,), 100)))


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_a_device_that_does_not_exist_is_a_clear_error(deployed_pair, tmp_path):
    """Issue 20 item 6: ``load_deployed(device="cuda:7")`` was a raw assertion from inside torch."""
    qd.save_deployed(deployed_pair(tiny_unet2d, "W8A8")[1], tmp_path / "d")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reason = f"this machine has {count} cuda device" if count else "no CUDA device is available here"
    with pytest.raises(ValueError, match=f"^device 'cuda:7': {reason}"):
        qd.load_deployed(tmp_path / "d", device="cuda:7")
    with pytest.raises(ValueError, match="^device 'gpu0' is not a torch device .*use cpu, cuda or cuda:N"):
        qd.load_deployed(tmp_path / "d", device="gpu0")
