import pytest
from torch import nn

from questdiff.adapters import GenericAdapter, get_adapter

from builders import CustomUNet


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
