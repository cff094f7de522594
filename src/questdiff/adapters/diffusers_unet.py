"""Adapter for diffusers ``UNet2DModel`` and ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL, class-conditional).

Text conditioning (``encoder_hidden_states``), class labels and SDXL's ``added_cond_kwargs`` pass through the
denoiser untouched; only the timestep argument is read (by the timestep hook).
"""
from __future__ import annotations

import re

from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ..nn.layers import is_quantizable
from .base import AttentionInfo, LayerInfo, register_adapter

_ATTN_PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "add_k_proj": "k", "add_v_proj": "v"}
_COND_PREFIXES = ("class_embedding", "add_embedding", "encoder_hid_proj", "add_time_proj")


def _is_cross(attn: Attention) -> bool:
    return bool(getattr(attn, "is_cross_attention", False)) or getattr(attn, "add_k_proj", None) is not None


def skip_splits(model: nn.Module) -> dict[str, int]:
    """Split channel of every up-block resnet shortcut conv.

    An up-block resnet sees ``cat([h, skip])`` where ``h`` has the output channels of the previous resnet in
    decoder order (the mid block's last resnet for the first one; upsamplers keep channels).
    """
    mid = getattr(model, "mid_block", None)
    if mid is not None and getattr(mid, "resnets", None):
        prev = mid.resnets[-1].out_channels
    else:
        prev = model.config.block_out_channels[-1]
    splits: dict[str, int] = {}
    for b, block in enumerate(model.up_blocks):
        for r, resnet in enumerate(getattr(block, "resnets", [])):
            shortcut = getattr(resnet, "conv_shortcut", None)
            if isinstance(shortcut, nn.Conv2d) and 0 < prev < shortcut.in_channels:
                splits[f"up_blocks.{b}.resnets.{r}.conv_shortcut"] = prev
            prev = resnet.out_channels
    return splits


class DiffusersUNetAdapter:
    """Roles of diffusers UNets."""

    name = "diffusers-unet"
    timestep_argument = "timestep"

    def layers(self, model: nn.Module) -> dict[str, LayerInfo]:
        infos = {n: LayerInfo(n) for n, m in model.named_modules() if is_quantizable(m)}
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                kind = "cross" if _is_cross(module) else "self"
                for sub, role in _ATTN_PROJECTIONS.items():
                    if f"{name}.{sub}" in infos:
                        infos[f"{name}.{sub}"].roles.add(f"attn.{kind}.{role}")
            elif isinstance(module, FeedForward):
                for sub, m in module.named_modules():
                    if f"{name}.{sub}" in infos:
                        infos[f"{name}.{sub}"].roles.add("ff")
            elif isinstance(module, ResnetBlock2D) and f"{name}.time_emb_proj" in infos:
                infos[f"{name}.time_emb_proj"].roles.add("time_proj")
        for name, info in infos.items():
            if name.startswith("time_embedding."):
                info.roles.add("time_embed")
            elif name.startswith(_COND_PREFIXES):
                info.roles.add("cond")
            elif re.search(r"\.(proj_in|proj_out)$", name):
                info.roles.add("proj")
        for name, split in skip_splits(model).items():
            infos[name].roles.add("skip")
            infos[name].split = split
        if "conv_in" in infos:
            infos["conv_in"].roles.add("first")
        if "conv_out" in infos:
            infos["conv_out"].roles.add("last")
        for info in infos.values():
            if not info.roles:
                info.roles.add("other")
        return infos

    def attentions(self, model: nn.Module) -> dict[str, AttentionInfo]:
        return {n: AttentionInfo(n, _is_cross(m)) for n, m in model.named_modules() if isinstance(m, Attention)}

    def blocks(self, model: nn.Module) -> list[str]:
        sections: list[tuple[str, nn.Module]] = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
        if getattr(model, "mid_block", None) is not None:
            sections.append(("mid_block", model.mid_block))
        sections += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
        units: list[str] = []
        for prefix, section in sections:
            found: list[tuple[int, int, str]] = []
            for name, module in section.named_modules():
                match = re.match(r"(resnets|attentions)\.(\d+)", name)
                if not match:
                    continue
                inside_transformer = ".transformer_blocks." in name and isinstance(module, BasicTransformerBlock)
                plain_attention = isinstance(module, Attention) and ".transformer_blocks." not in name
                if isinstance(module, ResnetBlock2D) or inside_transformer or plain_attention:
                    found.append((int(match.group(2)), 0 if match.group(1) == "resnets" else 1, f"{prefix}.{name}"))
            units += [name for _, _, name in sorted(found)]
        return units

    def to_dict(self) -> dict:
        return {"name": self.name}


@register_adapter(UNet2DModel)
@register_adapter(UNet2DConditionModel)
def _diffusers_unet() -> DiffusersUNetAdapter:
    return DiffusersUNetAdapter()
