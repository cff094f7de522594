import copy
import warnings

import pytest
import torch
from torch import nn

import questdiff as qd
from questdiff.adapters import GenericAdapter, get_adapter
from questdiff.calibration import CalibrationSet
from questdiff.calibration.brecq import reconstruction_units

from builders import CustomUNet
from foreign_builders import AttentionDenoiser, foreign_calibration


def test_unregistered_model_asks_for_generic_adapter():
    with pytest.raises(ValueError, match="GenericAdapter"):
        get_adapter(CustomUNet())


def test_role_selectors_by_glob_regex_type_and_predicate():
    adapter = GenericAdapter(
        "noise_level",
        roles={"time_embed": ["time_mlp"], "time_proj": ["re:emb_.*"], "skip": [lambda n, m: n == "fuse"]},
    )
    layers = adapter.layers(CustomUNet())
    assert layers["time_mlp.0"].roles == {"time_embed"} and layers["time_mlp.2"].roles == {"time_embed"}
    assert layers["emb_proj"].roles == {"time_proj"}
    assert layers["fuse"].roles == {"skip"}
    assert layers["inp"].roles == {"first"}  # default first layer skips the time embedding
    assert layers["out"].roles == {"last"}
    assert layers["up"].roles == {"other"}  # ConvTranspose2d is a conv: quantized


def test_type_selector_and_validation():
    layers = GenericAdapter("noise_level", roles={"other": [nn.Linear]}).layers(CustomUNet())
    assert "other" in layers["emb_proj"].roles
    with pytest.raises(ValueError, match="unknown roles"):
        GenericAdapter("t", roles={"attention": ["x"]})
    with pytest.raises(ValueError, match="timestep_argument"):
        GenericAdapter("")


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h):
        return h + self.conv(torch.nn.functional.silu(self.norm(h)))


class Routed(nn.Module):
    """Registration order differs from the forward: the output conv is registered first, blocks in a ModuleList run in
    reverse, a 1x1 conv beside the input conv also reads the raw input, and one block is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 1, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.conv_in = nn.Conv2d(1, 8, 3, padding=1)
        self.skip_in = nn.Conv2d(1, 8, 1)
        self.unused = Block(8)

    def forward(self, x, t):
        h = self.conv_in(x) + self.skip_in(x) + self.time(t.float().view(-1, 1) / 1000)[:, :, None, None]
        for block in reversed(self.blocks):
            h = block(h)
        return self.head(h)


def _routed_calibration():
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(8, 1, 8, 8, generator=g), "t": torch.tensor([900.0] * 4 + [100.0] * 4)}
    return CalibrationSet(inputs, torch.tensor([0] * 4 + [1] * 4), "x", "t")


def _routed_adapter():
    return GenericAdapter("t", roles={"time_embed": ["time"]})


def test_trace_gives_first_last_and_blocks_from_the_forward():
    model, adapter = Routed().eval(), _routed_adapter()
    adapter.trace(model, _routed_calibration().model_kwargs(slice(0, 1)), "x")
    layers = adapter.layers(model)
    assert {n for n, info in layers.items() if "first" in info.roles} == {"conv_in", "skip_in"}
    assert {n for n, info in layers.items() if "last" in info.roles} == {"head"}
    assert layers["time"].roles == {"time_embed"} and "unused.conv" not in layers  # never called: not quantized
    assert adapter.blocks(model) == ["blocks.1", "blocks.0"]  # ModuleList children, in call order


def test_blocks_and_roles_survive_prepare_and_load(tmp_path):
    model, adapter, calib = Routed().eval(), _routed_adapter(), _routed_calibration()
    fp = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"unused\.conv \(Conv2d, not selected by the adapter\)"):  # the uncalled layer is named as FP
        qd.quantize(model, "W4A4", calib, adapter=adapter, progress=False)
    assert adapter.blocks(model) == ["blocks.1", "blocks.0"]  # wrapped layers still make blocks
    assert reconstruction_units(model, calib, torch.device("cpu"))[:3] == ["conv_in", "skip_in", "time"]
    assert model.skip_in.act_quantizer.bits == 8 and model.blocks[0].conv.act_quantizer.bits == 4
    qd.save(model, tmp_path / "q")
    loaded = qd.load(tmp_path / "q", base=fp, adapter=_routed_adapter())
    assert {n: i.roles for n, i in qd.handle(loaded).layers.items()} == {n: i.roles for n, i in qd.handle(model).layers.items()}
    kwargs = calib.model_kwargs(slice(0, 2))
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs), model(**kwargs))
    with pytest.raises(ValueError, match="timestep_argument='t'"):
        qd.load(tmp_path / "q", base=copy.deepcopy(fp), adapter=GenericAdapter("noise_level"))


def test_untraced_blocks_expand_containers():
    assert GenericAdapter("t").blocks(Routed()) == ["blocks.0", "blocks.1", "unused"]


def test_trace_records_each_sdpa_call_and_names_hand_written_softmax():
    example = foreign_calibration().model_kwargs(slice(0, 1))
    adapter = GenericAdapter("t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SDPA only: nothing to warn about
        adapter.trace(AttentionDenoiser().eval(), example, "x")
    calls = adapter.attention_calls(AttentionDenoiser())
    assert [(c.owner, c.q_dim, c.k_dim, c.v_dim) for c in calls] == [("blocks.0", 8, 8, 8), ("blocks.1", 4, 4, 4), ("", 16, 16, 16)]
    manual = GenericAdapter("t")
    with pytest.warns(UserWarning, match=r"softmax is computed outside scaled_dot_product_attention in 'blocks.0', 'blocks.1'"):
        manual.trace(AttentionDenoiser(manual=True).eval(), example, "x")
    assert manual.attention_calls(AttentionDenoiser()) == []


class WithDiffusersAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.conv_in = nn.Conv2d(1, 16, 3, padding=1)
        self.attn = Attention(16, heads=2, dim_head=8)
        self.conv_out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t):
        h = self.conv_in(x) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000)
        tokens = self.attn(h.flatten(2).transpose(1, 2))
        tokens = tokens + torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
        return self.conv_out(tokens.transpose(1, 2).reshape(h.shape))


def test_attention_quantized_by_a_processor_is_not_traced_twice():
    model, calib = WithDiffusersAttention().eval(), foreign_calibration()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qd.quantize(model, "W8A8", calib, adapter=GenericAdapter("t"), progress=False)
    assert isinstance(model.attn.processor, qd.nn.QuantAttnProcessor)
    assert model.questdiff_sdpa.owners == [""]  # only the forward's own call; the processor's is not a site
    with torch.no_grad(), qd.quant_state(model, weight=False, act=False):  # the FP fallback processor calls SDPA too
        model(**calib.model_kwargs(slice(0, 2)))
