import torch

from questdiff.adapters import DiffusersUNetAdapter, get_adapter
from questdiff.adapters.diffusers_unet import skip_splits

from builders import tiny_cond_unet, tiny_unet2d


def test_registered_for_both_unet_classes():
    assert isinstance(get_adapter(tiny_unet2d()), DiffusersUNetAdapter)
    assert isinstance(get_adapter(tiny_cond_unet()), DiffusersUNetAdapter)


def test_roles_of_conditional_unet():
    unet = tiny_cond_unet()
    layers = DiffusersUNetAdapter().layers(unet)
    roles = {n: info.roles for n, info in layers.items()}
    assert roles["conv_in"] == {"first"} and roles["conv_out"] == {"last"}
    assert roles["time_embedding.linear_1"] == {"time_embed"}
    time_proj = [n for n, r in roles.items() if "time_proj" in r]
    assert time_proj and all(n.endswith("time_emb_proj") for n in time_proj)
    assert roles["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"] == {"attn.self.k"}
    assert roles["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == {"attn.cross.k"}
    assert roles["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"] == {"ff"}
    assert roles["down_blocks.0.attentions.0.proj_in"] == {"proj"}
    assert all(r for r in roles.values())


def test_skip_splits_match_the_concatenation():
    unet = tiny_cond_unet()
    splits = skip_splits(unet)
    assert splits and all(".conv_shortcut" in n and n.startswith("up_blocks") for n in splits)
    # verify against the real concat: record the decoder feature width entering each up-block resnet
    seen = {}
    hooks = []
    for name, split in splits.items():
        resnet = unet.get_submodule(name.rsplit(".", 1)[0])
        hooks.append(resnet.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].shape[1])))
    unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 3, 32))
    for h in hooks:
        h.remove()
    for name, split in splits.items():
        total = seen[name]
        assert 0 < split < total  # inputs are cat([h, skip]) of width `total`
    assert splits["up_blocks.0.resnets.0.conv_shortcut"] == unet.mid_block.resnets[-1].out_channels


def test_blocks_in_forward_order():
    blocks = DiffusersUNetAdapter().blocks(tiny_unet2d())
    assert blocks[0].startswith("down_blocks.0.resnets.0")
    assert blocks.index("mid_block.resnets.0") < blocks.index("mid_block.attentions.0") < blocks.index("mid_block.resnets.1")
    assert blocks[-1].startswith("up_blocks.1")
