"""W8A8-FP8 deployed: e4m3 weight and activation codes on the kernels (cuBLAS ``_scaled_mm`` or the Triton GEMMs
on a GPU, the reference on the CPU), equal to the fake-quant model up to summation order, every layer on the
kernels, a bit-exact round trip, and codes that stay e4m3 when the model is cast."""
from __future__ import annotations

import copy

import pytest
import torch

import questdiff as qd
from builders import tiny_cond_unet, tiny_unet2d
from builders_transformers import tiny_dit_pipeline
from fidelity import float_noise_floor, psnr
from questdiff.deploy import DeployedLayer
from questdiff.deploy.convert import deploy_layer, fake_quant_leftovers
from questdiff.fp8 import FP8_DTYPE
from questdiff.prepare import handle, quant_layers


@pytest.mark.parametrize("build", [tiny_unet2d, tiny_cond_unet], ids=["unet2d", "cond"])
def test_fp8_model_deploys_on_the_kernels_and_matches_fake_quant(build, make_quantized, inputs, tmp_path):
    fake = make_quantized(build, "W8A8-FP8")
    deployed = qd.convert(copy.deepcopy(fake))
    layers = [m for m in deployed.modules() if isinstance(m, DeployedLayer)]
    assert layers and all(m.runs_kernels for m in layers) and not fake_quant_leftovers(deployed)
    assert all(op.weight.dtype == FP8_DTYPE and op.act.fp8 for m in layers for op in m.operands)
    x, kwargs = inputs(fake)
    with torch.no_grad():
        ref, out = fake(x, torch.tensor(500), **kwargs).sample, deployed(x, torch.tensor(500), **kwargs).sample
    assert psnr(out, ref) > min(40.0, float_noise_floor(fake, x, 500, kwargs) - 2.0)
    qd.save_deployed(deployed, tmp_path / "deployed")
    with torch.no_grad():
        assert torch.equal(qd.load_deployed(tmp_path / "deployed")(x, torch.tensor(500), **kwargs).sample, out)
    deployed.to(torch.bfloat16)
    assert all(op.weight.dtype == FP8_DTYPE and op.weight_scale.dtype == torch.float32 for m in layers
               for op in m.operands)


def test_every_fp8_layer_equals_its_fake_quant_layer(make_quantized, inputs, layer_io):
    model = make_quantized(tiny_cond_unet, "W8A8-FP8")
    x, kwargs = inputs(model)
    seen = layer_io(model, x, torch.tensor(900), **kwargs)
    h = handle(model)
    with torch.no_grad(), h.state.at_timestep(900):
        for name, layer in quant_layers(model).items():
            inp, out = seen[name]
            torch.testing.assert_close(deploy_layer(layer, h.state, "auto", name)(inp), out, rtol=1e-5,
                                       atol=1e-5 * float(out.abs().max()), msg=name)


def test_fp8_dit_with_quest_skips_brecq_and_finetunes(caplog):
    pipe = tiny_dit_pipeline()
    calib = qd.collect_calibration(pipe, num_samples=2, calib_steps=3, num_inference_steps=4, progress=False)
    with caplog.at_level("WARNING"):
        model = qd.quantize(pipe.transformer, "W8A8-FP8", calib, "quest", progress=False,
                            tla={"epochs": 1, "samples_per_t": 2}, cma={"epochs": 1, "samples_per_t": 2})
    assert "BRECQ skipped" in caplog.text
    stats = handle(model).extra["calibration"]
    assert stats["brecq"]["units"] == 0 and stats["tla"]["steps"] > 0 and stats["cma"]["steps"] > 0
    deployed = qd.convert(copy.deepcopy(model))
    assert not fake_quant_leftovers(deployed)
    kwargs = calib.model_kwargs(torch.tensor([0, len(calib) - 1]))
    with torch.no_grad():
        assert psnr(deployed(**kwargs)[0], model(**kwargs)[0]) > 40
