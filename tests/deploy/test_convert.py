"""``convert``: deployed layers compute what the fake-quant layers compute (integer GEMMs exactly, up to fp32
rounding), and whole deployed models match their fake-quant twins."""
from __future__ import annotations

import pytest
import torch

import questdiff as qd
from builders import CHANNEL_W4A4, ROTATED_W4A4, SMOOTHED_ROTATED_W4A4, SMOOTHED_W4A4, tiny_cond_unet, tiny_unet2d
from fidelity import float_noise_floor, psnr
from questdiff.deploy import DeployedLayer, is_deployed
from questdiff.deploy.attention import DeployedAttnProcessor
from questdiff.deploy.convert import deploy_attention, deploy_layer
from questdiff.prepare import handle, quant_layers


PRESETS = ["W8A8", "W4A8", ROTATED_W4A4, SMOOTHED_W4A4, SMOOTHED_ROTATED_W4A4]
PRESET_IDS = ["W8A8", "W4A8", "W4A4-rot8", "W4A4-smooth", "W4A4-smooth-rot8"]


def _transforms(preset) -> tuple[bool, bool]:
    """Whether ``preset`` rotates / smooths the layer inputs."""
    activation = getattr(preset, "activation", None)
    return (getattr(activation, "rotation", None) is not None, getattr(activation, "smoothing", None) is not None)


@pytest.mark.parametrize("preset", PRESETS, ids=PRESET_IDS)
def test_every_deployed_layer_equals_its_fake_quant_layer(arch, preset, make_quantized, inputs, layer_io):
    model = make_quantized(arch, preset)
    x, kwargs = inputs(model)
    seen = layer_io(model, x, torch.tensor(500), **kwargs)
    h = handle(model)
    splits = rotations = smoothings = 0
    with torch.no_grad(), h.state.at_timestep(500):
        for name, layer in quant_layers(model).items():
            deployed = deploy_layer(layer, h.state, "auto", name)
            assert deployed.runs_kernels, name
            splits += bool(deployed.split)
            rotations += deployed.rotation is not None
            smoothings += deployed.smoothing is not None
            inp, out = seen[name]
            torch.testing.assert_close(deployed(inp), out, rtol=1e-5, atol=1e-5 * float(out.abs().max()), msg=name)
    assert splits or arch is not tiny_unet2d  # the UNet2D has split skip convs: they were covered
    assert (bool(rotations), bool(smoothings)) == _transforms(preset)


@pytest.mark.parametrize("preset", PRESETS, ids=PRESET_IDS)
def test_deployed_model_matches_fake_quant_model(arch, preset, deployed_pair, inputs):
    fake, deployed = deployed_pair(arch, preset)
    assert is_deployed(deployed) and not quant_layers(deployed)
    processors = [m.processor for m in deployed.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, DeployedAttnProcessor) and p.runs_kernels for p in processors)
    x, kwargs = inputs(fake)
    for t in (900, 500, 100):
        with torch.no_grad():
            ref = fake(x, torch.tensor(t), **kwargs).sample
            out = deployed(x, torch.tensor(t), **kwargs).sample
        # the kernels sum in another order than torch: compare against the fake-quant model's own float-noise floor
        # (W8A8 ~42 dB, rotated W4A4 ~22 dB on these tiny models); exact layer by layer (test above)
        floor = float_noise_floor(fake, x, t, kwargs)
        assert psnr(out, ref) > min(40.0, floor - 2.0), (t, floor)


@pytest.mark.parametrize("fmt", ["qk", "qkvp"])
def test_deployed_attention_equals_the_fake_quant_processor(fmt, make_quantized):
    """Each attention processor alone, on the same q/k/v projections: the deployed kernel format computes what the
    fake-quant processor computes (fp32, up to summation order)."""
    preset = qd.presets.W8A8.replace(attention=fmt)
    model = make_quantized(tiny_cond_unet, preset)
    h = handle(model)
    attentions = [m for m in model.modules() if hasattr(m, "processor") and hasattr(m, "to_q")]
    assert attentions
    g = torch.Generator().manual_seed(3)
    with torch.no_grad(), h.state.at_timestep(torch.tensor([500, 100])):  # a batch mixing two rows
        for attn in attentions:
            fake_processor = attn.processor
            deployed = deploy_attention(fake_processor, h.state, "auto")
            assert deployed.format == fmt and deployed.runs_kernels
            hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
            context = None if not attn.is_cross_attention else torch.randn(2, 5, attn.to_k.in_features, generator=g)
            query, key, value = attn.to_q(hidden), attn.to_k(hidden if context is None else context), \
                attn.to_v(hidden if context is None else context)
            ref = fake_processor._core(attn, query, key, value, None)
            out = deployed._core(attn, query, key, value, None)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_a_deployed_model_reads_each_samples_row_on_the_device(deployed_pair, inputs):
    """A batch whose samples have different timesteps gives each sample its own row (as per-sample calls do), and
    the timestep hook reads nothing on the host while traced: the forward runs under FakeTensorMode."""
    _, deployed = deployed_pair(tiny_cond_unet, "W8A8")
    x, kwargs = inputs(deployed, batch=2)
    with torch.no_grad():
        mixed = deployed(x, torch.tensor([900, 100]), **kwargs).sample
        single = torch.cat([deployed(x[i:i + 1], torch.tensor([t]), **{k: v[i:i + 1] for k, v in kwargs.items()}).sample
                            for i, t in enumerate((900, 100))])
    torch.testing.assert_close(mixed, single, rtol=1e-5, atol=1e-5 * float(single.abs().max()))
    assert not torch.allclose(mixed[0], deployed(x, torch.tensor([100, 100]), **kwargs).sample[0])

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        fake_x = mode.from_tensor(x)
        out = deployed(fake_x, mode.from_tensor(torch.tensor([900, 100])),
                       **{k: mode.from_tensor(v) for k, v in kwargs.items()}).sample
    assert out.shape == mixed.shape


def test_compiled_deployed_model_serves_every_timestep_without_recompiling(deployed_pair, inputs):
    """``torch.compile`` captures the whole deployed forward, the row lookup included: one graph, every timestep."""
    from torch._dynamo.testing import CompileCounter

    _, deployed = deployed_pair(tiny_cond_unet, "W8A8")
    x, kwargs = inputs(deployed, batch=2)
    with torch.no_grad():
        eager = [deployed(x, torch.tensor(t), **kwargs).sample for t in (900, 500, 100)]
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(deployed, backend=counter, fullgraph=True)
    with torch.no_grad():
        outs = [compiled(x, torch.tensor(900), **kwargs).sample]
        frames = counter.frame_count  # the timestep hook and the forward
        outs += [compiled(x, torch.tensor(t), **kwargs).sample for t in (500, 100)]
    assert counter.frame_count == frames  # no recompilation for another timestep
    for out, ref in zip(outs, eager):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_per_channel_activations_run_simulated_and_exact(make_quantized, inputs):
    fake = make_quantized(tiny_unet2d, CHANNEL_W4A4)  # 4-bit activations: per input channel, no GEMM can apply them
    with pytest.warns(UserWarning, match="simulated"):
        deployed = qd.convert(make_quantized(tiny_unet2d, CHANNEL_W4A4))
    layers = [m for m in deployed.modules() if isinstance(m, DeployedLayer)]
    assert any(not m.runs_kernels for m in layers)
    x, _ = inputs(fake)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x, torch.tensor(500)).sample, fake(x, torch.tensor(500)).sample,
                                   rtol=1e-4, atol=1e-4)


def test_scale_tables_stay_fp32_when_the_model_is_cast(deployed_pair):
    _, deployed = deployed_pair(tiny_unet2d, "W8A8")
    deployed.to(torch.bfloat16)
    layer = next(m for m in deployed.modules() if isinstance(m, DeployedLayer))
    operand = layer.operands[0]
    assert operand.act.scale.dtype == torch.float32 and operand.weight_scale.dtype == torch.float32
    assert operand.weight.dtype == torch.int8 and layer.bias.dtype == torch.bfloat16


def test_convert_refuses_bad_input(make_quantized, monkeypatch):
    with pytest.raises(ValueError, match="not quantized"):
        qd.convert(tiny_unet2d())
    model = make_quantized(tiny_unet2d, "W8A8")
    with pytest.raises(ValueError, match="unknown backend"):
        qd.convert(model, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        qd.convert(model, backend="triton")
    qd.convert(model)
    with pytest.raises(ValueError, match="already converted"):
        qd.convert(model)


def test_triton_backend_through_the_interpreter_matches_reference(deployed_pair, inputs, monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("covered on the GPU by tests/kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake, deployed = deployed_pair(tiny_unet2d, "W8A8")
    x, _ = inputs(fake, batch=1)
    with torch.no_grad():
        ref = deployed(x, torch.tensor(500)).sample
        for m in deployed.modules():
            if isinstance(m, DeployedLayer):
                m.backend = "triton"
            if isinstance(getattr(m, "processor", None), DeployedAttnProcessor):
                m.processor.backend = "triton"
        out = deployed(x, torch.tensor(500)).sample
    assert psnr(out, ref) > 60


def test_a_tutorial_style_upsampler_deploys_whole_and_saves(tmp_path):
    """ConvTranspose2d ups (every DDPM-tutorial UNet has them) used to stay fake-quant, so save_deployed refused."""
    class Upsampler(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.up = torch.nn.ConvTranspose2d(4, 1, 2, stride=2)

        def forward(self, x, t):
            return self.up(torch.relu(self.inp(x)) + t.float().view(-1, 1, 1, 1) / 1000)

    model = Upsampler()
    with qd.record_calibration(model, "t") as rec:
        for t in (900, 100):
            model(torch.randn(2, 1, 8, 8), torch.full((2,), t))
    qd.quantize(model, "W8A8", rec.result(), adapter=qd.GenericAdapter("t"), progress=False)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = model(x, torch.full((2,), 100))
    qd.convert(model)
    assert isinstance(model.inp, DeployedLayer) and isinstance(model.up, DeployedLayer) and model.up.runs_kernels
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.full((2,), 100)), ref, rtol=1e-5, atol=1e-5)
    qd.save_deployed(model, tmp_path)
