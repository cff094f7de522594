"""Deployed models on the GPU: the Triton backend against the reference backend, eager and under torch.compile."""
from __future__ import annotations

import pytest
import torch

from builders import tiny_cond_unet
from questdiff.deploy import DeployedLayer
from questdiff.deploy.attention import DeployedAttnProcessor

pytestmark = pytest.mark.gpu


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, DeployedLayer):
            m.backend = backend
        if isinstance(getattr(m, "processor", None), DeployedAttnProcessor):
            m.processor.backend = backend


@pytest.mark.parametrize("preset", ["W8A8", "W4A8"])
def test_triton_backend_matches_reference_and_compiles(deployed_pair, inputs, preset):
    fake, deployed = deployed_pair(tiny_cond_unet, preset)
    deployed = deployed.cuda()
    x, kwargs = inputs(fake, batch=4)
    x, kwargs = x.cuda(), {k: v.cuda() for k, v in kwargs.items()}
    t = torch.tensor(500, device="cuda")
    with torch.no_grad():
        out = deployed(x, t, **kwargs).sample
        _set_backend(deployed, "reference")
        ref = deployed(x, t, **kwargs).sample
        _set_backend(deployed, "auto")
        compiled = torch.compile(deployed)
        outs = [compiled(x, torch.tensor(s, device="cuda"), **kwargs).sample for s in (500, 100, 500)]
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    torch.testing.assert_close(outs[0], out, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])  # the row follows the timestep
