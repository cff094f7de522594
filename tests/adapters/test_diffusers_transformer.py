import logging

import pytest
import torch
from diffusers import Transformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

from questdiff.adapters import ROLE_NAMES, DiffusersTransformerAdapter, GenericAdapter, get_adapter, role_matches
from questdiff.nn import QuantAttnProcessor, QuantFluxAttnProcessor, QuantJointAttnProcessor

from builders_transformers import tiny_dit, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

ADAPTER = DiffusersTransformerAdapter()


def _roles(model):
    return {n: info.roles for n, info in ADAPTER.layers(model).items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {
        "dit": tiny_dit(),
        "pixart": tiny_pixart_pipeline(tmp).transformer,
        "sd3": tiny_sd3_pipeline(tmp).transformer,
        "flux": tiny_flux_pipeline(tmp).transformer,
    }


def test_registered_for_every_transformer_class(models):
    patched = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, sample_size=4,
                                 patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero", num_layers=1)
    for model in [*models.values(), patched]:
        assert isinstance(get_adapter(model), DiffusersTransformerAdapter), type(model).__name__
    roles = _roles(patched)
    assert roles["pos_embed.proj"] == {"first"} and roles["proj_out_2"] == {"last"}
    assert roles["proj_out_1"] == {"time_proj"}


def test_dit_roles(models):
    roles = _roles(models["dit"])
    assert roles["pos_embed.proj"] == {"first"} and roles["proj_out_2"] == {"last"}
    block = "transformer_blocks.1."
    assert roles[block + "norm1.emb.timestep_embedder.linear_1"] == {"time_embed"}
    assert roles[block + "norm1.emb.timestep_embedder.linear_2"] == {"time_embed"}
    assert roles[block + "norm1.linear"] == {"time_proj"}  # adaLN-Zero modulation (shift/scale/gate x2)
    assert roles["proj_out_1"] == {"time_proj"}  # the final adaLN
    assert [roles[block + f"attn1.{p}"] for p in ("to_q", "to_k", "to_v", "to_out.0")] == [
        {"attn.self.q"}, {"attn.self.k"}, {"attn.self.v"}, {"attn.self.out"}]
    assert roles[block + "ff.net.0.proj"] == roles[block + "ff.net.2"] == {"ff"}
    assert "other" not in set().union(*roles.values())  # every DiT layer has a named role


def test_pixart_roles(models):
    roles = _roles(models["pixart"])
    assert roles["adaln_single.emb.timestep_embedder.linear_1"] == {"time_embed"}
    assert roles["adaln_single.linear"] == {"time_proj"}
    assert roles["caption_projection.linear_1"] == roles["caption_projection.linear_2"] == {"cond"}
    assert roles["transformer_blocks.0.attn2.to_k"] == {"attn.cross.k"}
    assert roles["transformer_blocks.0.attn1.to_k"] == {"attn.self.k"}
    assert roles["pos_embed.proj"] == {"first"} and roles["proj_out"] == {"last"}


def test_sd3_roles(models):
    roles = _roles(models["sd3"])
    assert roles["time_text_embed.timestep_embedder.linear_2"] == {"time_embed"}
    assert roles["time_text_embed.text_embedder.linear_1"] == {"cond"} and roles["context_embedder"] == {"cond"}
    for name in ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                 "transformer_blocks.1.norm1_context.linear", "norm_out.linear"):
        assert roles[name] == {"time_proj"}, name
    attn = "transformer_blocks.0.attn."
    assert roles[attn + "to_q"] == {"attn.joint.q"} and roles[attn + "to_out.0"] == {"attn.joint.out"}
    assert roles[attn + "add_q_proj"] == {"attn.joint.context.q"} and roles[attn + "to_add_out"] == {"attn.joint.context.out"}
    assert roles["transformer_blocks.0.attn2.to_v"] == {"attn.self.v"}  # SD3.5's second (image-only) attention
    assert roles["transformer_blocks.0.ff_context.net.2"] == {"ff"}
    assert role_matches("attn.joint.context.k", "attn.joint") and not role_matches("attn.joint.context.k", "attn.joint.k")


def test_flux_roles(models):
    roles = _roles(models["flux"])
    assert roles["x_embedder"] == {"first"} and roles["proj_out"] == {"last"}
    assert roles["time_text_embed.timestep_embedder.linear_1"] == {"time_embed"}
    assert roles["time_text_embed.guidance_embedder.linear_1"] == {"cond"}
    assert roles["time_text_embed.text_embedder.linear_1"] == {"cond"} and roles["context_embedder"] == {"cond"}
    assert roles["transformer_blocks.0.norm1.linear"] == roles["single_transformer_blocks.0.norm.linear"] == {"time_proj"}
    assert roles["transformer_blocks.0.attn.add_k_proj"] == {"attn.joint.context.k"}
    assert roles["single_transformer_blocks.0.attn.to_q"] == {"attn.self.q"}
    assert roles["single_transformer_blocks.0.proj_mlp"] == {"ff"}
    assert roles["single_transformer_blocks.0.proj_out"] == {"ff", "attn.self.out"}  # cat(attention, mlp) -> dim


def test_every_role_is_a_known_role(models):
    """Known roles: sensitivity groups by ``ROLE_NAMES`` and ``GenericAdapter`` accepts them."""
    used = set().union(*(info.roles for model in models.values() for info in ADAPTER.layers(model).values()))
    assert used <= set(ROLE_NAMES), used - set(ROLE_NAMES)
    GenericAdapter("timestep", roles={"attn.joint.context.q": ["*.add_q_proj"]})


@pytest.mark.parametrize("name, processors", [
    ("dit", {QuantAttnProcessor}), ("pixart", {QuantAttnProcessor}), ("sd3", {QuantJointAttnProcessor}),
    ("flux", {QuantFluxAttnProcessor}),
])
def test_every_attention_gets_its_flavour_of_processor(models, name, processors):
    model = models[name]
    attentions = ADAPTER.attentions(model)
    expected = [n for n, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "to_q")]
    assert sorted(attentions) == sorted(expected) and expected
    assert {info.processor for info in attentions.values()} == processors
    cross = {n for n, info in attentions.items() if info.cross}
    if name == "pixart":
        assert cross == {n for n in expected if n.endswith("attn2")}
    if name == "flux":
        assert cross == {"transformer_blocks.0.attn"}  # joint attention; single blocks attend to one sequence


def test_blocks_are_the_transformer_blocks(models):
    assert ADAPTER.blocks(models["dit"]) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert ADAPTER.blocks(models["flux"]) == ["transformer_blocks.0", "single_transformer_blocks.0"]


def test_unknown_attention_processor_stays_fp_with_a_warning(caplog):
    model = tiny_dit()
    model.transformer_blocks[0].attn1.set_processor(XFormersAttnProcessor())
    with caplog.at_level(logging.WARNING):
        attentions = ADAPTER.attentions(model)
    assert list(attentions) == ["transformer_blocks.1.attn1"]
    assert "transformer_blocks.0.attn1 uses XFormersAttnProcessor" in caplog.text and "full precision" in caplog.text
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor2_0())
    assert len(ADAPTER.attentions(model)) == 2
    assert torch.isfinite(model(torch.randn(1, 4, 4, 4), torch.tensor([3]), torch.tensor([1])).sample).all()
