"""Deployed diffusion transformers: a DiT's linears and attention run the deployed kernels and match the fake-quant
model; joint-attention processors without a deployed form stay fake-quant, named."""
from __future__ import annotations

import copy

import pytest
import torch

import questdiff as qd
from builders_transformers import tiny_dit_pipeline, tiny_sd3_pipeline
from questdiff.deploy import DeployedLayer
from questdiff.deploy.attention import DeployedAttnProcessor
from questdiff.deploy.convert import fake_quant_leftovers


def _quantized(pipe, **call):
    calib = qd.collect_calibration(pipe, num_samples=2, num_inference_steps=3, progress=False, **call)
    return qd.quantize(pipe.transformer, "W8A8", calib, progress=False)


def test_dit_deploys_fully_and_matches_fake_quant(tmp_path):
    pipe = tiny_dit_pipeline()
    fake = _quantized(pipe)
    deployed = qd.convert(copy.deepcopy(fake))
    assert not fake_quant_leftovers(deployed)
    assert any(isinstance(m, DeployedLayer) for m in deployed.modules())
    assert any(isinstance(getattr(m, "processor", None), DeployedAttnProcessor) for m in deployed.modules())
    c = fake.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    t, labels = torch.tensor([500, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = fake(x, timestep=t, class_labels=labels).sample
        out = deployed(x, timestep=t, class_labels=labels).sample
    assert float(10 * torch.log10(ref.abs().max() ** 2 / ((out - ref) ** 2).mean())) > 40
    qd.save_deployed(deployed, tmp_path)
    with torch.no_grad():
        assert torch.equal(qd.load_deployed(tmp_path)(x, timestep=t, class_labels=labels).sample, out)


def test_joint_attention_stays_fake_quant_and_is_named(tmp_path):
    pipe = tiny_sd3_pipeline(tmp_path)
    fake = _quantized(pipe, prompts=["a red shoe"])
    with pytest.warns(UserWarning, match="stay in fake quantization"):
        deployed = qd.convert(fake)
    assert any(isinstance(m, DeployedLayer) for m in deployed.modules())
    with pytest.raises(ValueError, match="cannot pack yet"):
        qd.save_deployed(deployed, tmp_path / "out")
