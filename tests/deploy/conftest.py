import copy

import pytest
import torch

import questdiff as qd
from builders import tiny_cond_unet, tiny_unet2d
from questdiff.prepare import quant_layers

TIMESTEPS = (900, 500, 100)


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    kwargs = {}
    if getattr(c, "cross_attention_dim", None):
        kwargs["encoder_hidden_states"] = torch.randn(batch, 5, c.cross_attention_dim, generator=g)
    return torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g), kwargs


def quantize_tiny(build, preset, method="rtn"):
    """A tiny diffusers UNet quantized with calibration rows recorded at ``TIMESTEPS``."""
    unet = build()
    with qd.record_calibration(unet) as rec:
        for i, t in enumerate(TIMESTEPS):
            x, kwargs = _inputs(unet, seed=i)
            unet(x, torch.tensor(t), **kwargs)
    return qd.quantize(unet, preset, rec.result(), method=method, progress=False)


@pytest.fixture(params=["unet2d", "cond"])
def arch(request):
    return {"unet2d": tiny_unet2d, "cond": tiny_cond_unet}[request.param]


@pytest.fixture
def inputs():
    return _inputs


def _layer_io(model, *args, **kwargs):
    """``{layer name: (input, output)}`` of every fake-quant layer in one no-grad forward ``model(*args, **kwargs)``."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, m in quant_layers(model).items()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.fixture
def layer_io():
    return _layer_io


@pytest.fixture
def make_quantized():
    return quantize_tiny


@pytest.fixture
def deployed_pair():
    """``(fake_quant, deployed)`` twins of a tiny model at a preset."""

    def make(build, preset):
        fake = quantize_tiny(build, preset)
        return fake, qd.convert(copy.deepcopy(fake))  # a deep copy routes its own timesteps (DESIGN §3)

    return make

