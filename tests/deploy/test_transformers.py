"""Deployed diffusion transformers and SDPA-calling denoisers: every attention flavour (diffusers ``Attention``, SD3
joint attention, FLUX attention, intercepted ``F.scaled_dot_product_attention`` calls) converts to its deployed form,
nothing stays in fake quantization, the outputs match the fake-quant model and save/load round-trips bit-exactly."""
from __future__ import annotations

import copy

import pytest
import torch

import questdiff as qd
from builders_transformers import PROMPTS, tiny_dit_pipeline, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline
from fidelity import psnr
from foreign_builders import AttentionDenoiser, foreign_calibration
from questdiff.deploy import DeployedLayer
from questdiff.deploy.attention import DeployedOperands
from questdiff.deploy.convert import fake_quant_leftovers
from questdiff.nn.sdpa import SDPA_ATTR

TEXT = {"prompts": PROMPTS[:1], "max_sequence_length": 8}
CASES = {  # builder, collect kwargs, deployed attention kind
    "dit": (lambda tmp: tiny_dit_pipeline(), {}, "attn"),
    "pixart": (tiny_pixart_pipeline, {**TEXT, "height": 8, "width": 8, "use_resolution_binning": False,
                                      "clean_caption": False}, "attn"),
    "sd3": (tiny_sd3_pipeline, {**TEXT, "height": 8, "width": 8}, "joint"),
    "flux": (tiny_flux_pipeline, {**TEXT, "height": 16, "width": 16}, "flux"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_transformer_attention_deploys_and_matches_fake_quant(name, tmp_path):
    build, call, kind = CASES[name]
    pipe = build(tmp_path)
    calib = qd.collect_calibration(pipe, num_samples=2, calib_steps=3, num_inference_steps=4, progress=False, **call)
    fake = qd.quantize(pipe.transformer, "W8A8", calib, progress=False)
    deployed = qd.convert(copy.deepcopy(fake))
    assert not fake_quant_leftovers(deployed)
    attentions = [m for m in deployed.modules() if isinstance(m, DeployedOperands)]
    assert attentions and all(a.kind == kind and a.format == "qk" and a.runs_kernels for a in attentions)
    assert any(isinstance(m, DeployedLayer) for m in deployed.modules())
    kwargs = calib.model_kwargs(torch.tensor([0, len(calib) - 1]))  # two samples, two timesteps
    with torch.no_grad():
        ref, out = fake(**kwargs)[0], deployed(**kwargs)[0]
    assert psnr(out, ref) > 40, name
    qd.save_deployed(deployed, tmp_path / "deployed")
    with torch.no_grad():
        assert torch.equal(qd.load_deployed(tmp_path / "deployed")(**kwargs)[0], out)


def test_intercepted_sdpa_calls_deploy_and_round_trip(tmp_path):
    model, calib = AttentionDenoiser().eval(), foreign_calibration()
    adapter = qd.GenericAdapter("t")
    fake = qd.quantize(model, "W8A8", calib, adapter=adapter, progress=False)
    deployed = qd.convert(copy.deepcopy(fake))
    sites = getattr(deployed, SDPA_ATTR).sites
    assert not fake_quant_leftovers(deployed) and all(isinstance(s, DeployedOperands) and s.kind == "sdpa" for s in sites)
    kwargs = calib.model_kwargs(slice(0, 3))
    with torch.no_grad():
        ref, out = fake(**kwargs), deployed(**kwargs)
    assert psnr(out, ref) > 40  # the forward's own call is causal: it runs the simulated (masked) path
    qd.save_deployed(deployed, tmp_path / "deployed")
    loaded = qd.load_deployed(tmp_path / "deployed", model=AttentionDenoiser().eval())
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs), out)
