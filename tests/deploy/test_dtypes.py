"""bf16 / fp16 models (#22): fake quantization and the deployed layers take the same integers (computed in fp32 from the
exact value), the quantizers keep fp32 grids through ``.to(dtype)``, and a deployed checkpoint reloads in its dtype,
bit-exactly, W4A8 (packed) included."""
from __future__ import annotations

import copy

import pytest
import torch

import questdiff as qd
from builders import tiny_unet2d
from questdiff.deploy import DeployedLayer
from questdiff.deploy.convert import deploy_layer
from questdiff.prepare import act_quantizers, handle, quant_layers, weight_quantizers

DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_quantizer_grids_stay_fp32_when_the_model_is_cast(make_quantized, dtype):
    model = make_quantized(tiny_unet2d, "W8A8")
    scales = {n: q.scale.clone() for n, q in act_quantizers(model).items()}
    model.to(dtype)
    assert all(q.scale.dtype == torch.float32 and torch.equal(q.scale, scales[n])
               for n, q in act_quantizers(model).items())
    assert all(q.scale.dtype == q.zero_point.dtype == torch.float32 for q in weight_quantizers(model).values())
    assert next(iter(quant_layers(model).values())).weight.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["W8A8", "W4A8"])
def test_fake_quant_and_deployed_layers_take_the_same_integers(make_quantized, inputs, layer_io, dtype, preset):
    model = make_quantized(tiny_unet2d, preset).to(dtype)
    x, _ = inputs(model)
    seen = layer_io(model, x.to(dtype), torch.tensor(500))
    h = handle(model)
    with torch.no_grad(), h.state.at_timestep(500):
        for name, layer in quant_layers(model).items():
            inp, out = seen[name]
            deployed = deploy_layer(layer, h.state, "auto", name)
            operand = deployed.operands[0]
            part = inp[:, :layer.split] if layer.split else inp
            # the dequantized activations are the same values, bit for bit
            assert torch.equal(operand.act.fake_quantize(part, deployed.channel_dim), layer.act_quantizer(part)), name
            y = deployed(inp)
            assert y.dtype == dtype
            # the outputs differ only by where the result is rounded to 16 bits (the kernel accumulates exactly)
            torch.testing.assert_close(y.float(), out.float(), rtol=0.02, atol=0.02 * float(out.abs().max()), msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["W8A8", "W4A8"])
def test_deployed_round_trip_keeps_the_dtype_bit_exactly(make_quantized, inputs, dtype, preset, tmp_path):
    deployed = qd.convert(copy.deepcopy(make_quantized(tiny_unet2d, preset))).to(dtype)
    if preset == "W4A8":
        assert any(op.weight_bits == 4 for m in deployed.modules() if isinstance(m, DeployedLayer) for op in m.operands)
    qd.save_deployed(deployed, tmp_path)
    loaded = qd.load_deployed(tmp_path)
    x, _ = inputs(deployed)
    with torch.no_grad():
        for t in (900, 100):
            out = loaded(x.to(dtype), torch.tensor(t)).sample
            assert out.dtype == dtype and torch.equal(out, deployed(x.to(dtype), torch.tensor(t)).sample)
    layer = next(m for m in loaded.modules() if isinstance(m, DeployedLayer))
    assert layer.bias.dtype == dtype and layer.operands[0].act.scale.dtype == torch.float32
