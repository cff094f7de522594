"""Deployed models on the GPU: the Triton backend against the reference backend, eager, under torch.compile and
captured in a CUDA graph that serves every timestep."""
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


def _cuda_pair(deployed_pair, inputs, preset):
    fake, deployed = deployed_pair(tiny_cond_unet, preset)
    deployed = deployed.cuda()
    x, kwargs = inputs(fake, batch=4)
    return deployed, x.cuda(), {k: v.cuda() for k, v in kwargs.items()}


@pytest.mark.parametrize("preset", ["W8A8", "W4A8"])
def test_triton_backend_matches_reference_and_compiles(deployed_pair, inputs, preset):
    deployed, x, kwargs = _cuda_pair(deployed_pair, inputs, preset)
    t = torch.tensor(500, device="cuda")
    with torch.no_grad():
        out = deployed(x, t, **kwargs).sample
        _set_backend(deployed, "reference")
        ref = deployed(x, t, **kwargs).sample
        _set_backend(deployed, "auto")
        compiled = torch.compile(deployed)
        outs = [compiled(x, torch.tensor(s, device="cuda"), **kwargs).sample for s in (500, 100, 500)]
    # P v runs in tf32 in the kernel for this fp32 model, in fp32 in the reference
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    torch.testing.assert_close(outs[0], out, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])  # the row follows the timestep


def test_one_cuda_graph_serves_every_timestep(deployed_pair, inputs):
    """The whole deployed forward, timestep hook included, captured once: replays at other timesteps equal eager."""
    deployed, x, kwargs = _cuda_pair(deployed_pair, inputs, "W8A8")
    static_t = torch.tensor(500, device="cuda")
    with torch.no_grad():
        deployed(x, static_t, **kwargs)  # autotune outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            deployed(x, static_t, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = deployed(x, static_t, **kwargs).sample
        for t in (900, 100, 500):
            static_t.fill_(t)
            graph.replay()
            eager = deployed(x, torch.tensor(t, device="cuda"), **kwargs).sample
            torch.testing.assert_close(captured, eager, rtol=0, atol=0)
