"""Every conv geometry deploys onto the 2-D implicit-GEMM kernel (#22): ConvTranspose1d/2d/3d, Conv1d/3d, grouped,
dilated and strided convs, every padding mode and string padding; they match their fake-quant layers, save and load
bit-exactly, run through the Triton interpreter, and what cannot be packed is refused by ``convert`` up front."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import questdiff as qd
from questdiff.config import QuantConfig, WeightSpec
from questdiff.deploy import DeployedConv, DeployedLayer
from builders import CHANNEL_W4A4, SMOOTHED_W4A4

LAYERS = {
    "convT2d": lambda: nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1),
    "convT2d-output_padding": lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
    "convT2d-grouped-dilated": lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2),
    "convT1d-crop": lambda: nn.ConvTranspose1d(4, 6, 3, stride=3, padding=2),  # padding > dilation * (k - 1)
    "convT3d": lambda: nn.ConvTranspose3d(4, 6, 2, stride=2),
    "conv3d": lambda: nn.Conv3d(4, 6, 3, stride=(2, 1, 1), padding=1),
    "conv3d-replicate-dilated": lambda: nn.Conv3d(4, 6, (3, 1, 3), padding=(1, 0, 2), padding_mode="replicate",
                                                  dilation=(1, 1, 2)),
    "conv1d": lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2),
    "conv1d-same-circular": lambda: nn.Conv1d(4, 6, 3, padding="same", padding_mode="circular"),
    "conv2d-grouped": lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
    "conv2d-depthwise-dilated": lambda: nn.Conv2d(4, 8, 3, groups=4, padding=2, dilation=2),
    "conv2d-reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "conv2d-same-even": lambda: nn.Conv2d(4, 6, 4, padding="same"),
    "conv2d-valid-strided": lambda: nn.Conv2d(4, 6, 3, padding="valid", stride=2),
}
SHAPES = {1: (2, 4, 9), 2: (2, 4, 7, 6), 3: (2, 4, 5, 6, 4)}


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.layer(x + t.float().view(-1, *[1] * (x.ndim - 1)) / 1000)


def _quantized(name: str, preset) -> tuple[OneLayer, torch.Tensor]:
    torch.manual_seed(0)
    model = OneLayer(LAYERS[name]())
    shape = SHAPES[model.layer.weight.ndim - 2]
    with qd.record_calibration(model, "t") as rec:
        for t in (900, 100):
            model(torch.randn(*shape), torch.full((2,), t))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "same" padding with an even kernel: torch's own note
        qd.quantize(model, preset, rec.result(), adapter=qd.GenericAdapter("t"), progress=False)
    return model, torch.randn(*shape)


def _convert(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the W4A4 layers' "simulated" note
        return qd.convert(copy.deepcopy(model))


T = torch.full((2,), 100)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("preset", ["W8A8", "W4A8", SMOOTHED_W4A4])  # smoothed: per-tensor 4-bit grids
def test_every_conv_geometry_runs_the_kernels_and_matches_fake_quant(name, preset, tmp_path):
    fake, x = _quantized(name, preset)
    deployed = _convert(fake)
    assert isinstance(deployed.layer, DeployedConv) and deployed.layer.runs_kernels
    with torch.no_grad():
        ref, out = fake(x, T), deployed(x, T)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    qd.save_deployed(deployed, tmp_path)
    with torch.no_grad():
        assert torch.equal(qd.load_deployed(tmp_path, model=OneLayer(LAYERS[name]()))(x, T), out)


@pytest.mark.parametrize("name", ["convT2d-grouped-dilated", "convT3d", "conv1d-same-circular", "conv3d"])
def test_per_channel_activations_simulate_every_geometry_exactly(name):
    fake, x = _quantized(name, CHANNEL_W4A4)  # 4-bit activations per input channel: no GEMM applies them
    deployed = _convert(fake)
    assert not deployed.layer.runs_kernels
    with torch.no_grad():
        assert torch.equal(deployed(x, T), fake(x, T))


def test_per_group_weights_of_a_transposed_conv_simulate_exactly():
    config = QuantConfig(weight=WeightSpec(bits=8, granularity="group", group_size=8))
    fake, x = _quantized("convT2d", config)
    deployed = _convert(fake)
    assert not deployed.layer.runs_kernels
    with torch.no_grad():
        torch.testing.assert_close(deployed(x, T), fake(x, T), rtol=1e-6, atol=1e-6)


def test_transposed_conv_takes_output_size():
    fake, x = _quantized("convT2d-output_padding", "W8A8")  # 7x6 -> 13x11 or 14x12
    deployed = _convert(fake)
    with torch.no_grad(), qd.at_timestep(fake, 100), qd.at_timestep(deployed, 100):
        for size in ([13, 11], [14, 12]):
            ref = fake.layer(x, output_size=size)
            out = deployed.layer(x, output_size=size)
            assert out.shape[2:] == tuple(size)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    conv = _convert(_quantized("conv1d", "W8A8")[0])
    with pytest.raises(ValueError, match="transposed convolutions only"), qd.at_timestep(conv, 100):
        conv.layer(x[..., 0], output_size=[5])


@pytest.mark.parametrize("name", ["convT2d", "conv3d", "conv1d", "conv2d-grouped", "conv2d-depthwise-dilated"])
def test_triton_interpreter_matches_reference(name, monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("covered on the GPU by tests/kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake, x = _quantized(name, "W8A8")
    deployed = _convert(fake)
    with torch.no_grad():
        ref = deployed(x, T)
        deployed.layer.backend = "triton"
        torch.testing.assert_close(deployed(x, T), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_convert_refuses_what_it_cannot_pack_naming_the_layer_before_any_change():
    class TwoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.head = nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x, t):
            return self.head(self.up(x + t.float().view(-1, 1, 1, 1) / 1000))

    model = TwoLayers()
    with qd.record_calibration(model, "t") as rec:
        for t in (900, 100):
            model(torch.randn(2, 4, 4, 4), torch.full((2,), t))
    qd.quantize(model, "W16A16", rec.result(), adapter=qd.GenericAdapter("t"), progress=False)
    with pytest.raises(ValueError, match="layer up: convert supports up to 8-bit"):
        qd.convert(model)
    assert not any(isinstance(m, DeployedLayer) for m in model.modules())  # nothing was swapped
