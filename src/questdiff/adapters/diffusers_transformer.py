"""Adapter for diffusers diffusion transformers: DiT, PixArt-alpha/sigma, SD3 / SD3.5 (MMDiT, joint attention),
FLUX (double- and single-stream blocks, rotary embeddings) and the patched ``Transformer2DModel``.

QuEST's roles on a DiT (DESIGN §6):

=====================================  ========================================================================
``time_embed``                         the timestep embedder MLP (``timestep_embedder.linear_{1,2}``: sinusoid ->
                                       embedding; DiT has one per block, PixArt/SD3/FLUX one per model)
``time_proj``                          the adaLN modulation linears fed by that embedding (``AdaLayerNorm*``
                                       ``.linear`` of every block and of ``norm_out``; PixArt's global
                                       ``adaln_single.linear``; DiT's final ``proj_out_1``): the analog of a UNet's
                                       ``time_emb_proj``, trained by TLA
``attn.self.*`` / ``attn.cross.*``     q/k/v/out of self- and cross-attention (FLUX single blocks: self)
``attn.joint.{q,k,v,out}``             image-stream projections of joint attention (SD3, FLUX double blocks)
``attn.joint.context.{q,k,v,out}``     its context-stream projections (``add_{q,k,v}_proj``, ``to_add_out``)
``ff``                                 feed-forward layers (incl. ``ff_context``; FLUX single blocks' ``proj_mlp``
                                       and their ``proj_out``, which also projects the attention output)
``first`` / ``last``                   patch embedding (``pos_embed.proj``, FLUX ``x_embedder``, ``proj_in``) /
                                       the output projection (``proj_out``, DiT ``proj_out_2``)
``cond``                               caption / pooled-text / guidance / size embedders, ``context_embedder``
=====================================  ========================================================================

Blocks (BRECQ units) are the elements of the model's top-level ``*blocks`` lists. Attention processors are chosen
by the attention's current processor class; an attention with another processor keeps FP matmuls (with a warning).
"""
from __future__ import annotations

import logging

from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    Transformer2DModel,
)
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxSingleTransformerBlock
from torch import nn

from ..nn.attention import QuantAttnProcessor
from ..nn.attention_joint import QuantFluxAttnProcessor, QuantJointAttnProcessor
from ..nn.layers import QUANTIZABLE_TYPES
from .base import AttentionInfo, LayerInfo, register_adapter

logger = logging.getLogger(__name__)

QUANT_PROCESSORS: dict[type, type[nn.Module]] = {
    AttnProcessor: QuantAttnProcessor,
    AttnProcessor2_0: QuantAttnProcessor,
    JointAttnProcessor2_0: QuantJointAttnProcessor,
    FluxAttnProcessor: QuantFluxAttnProcessor,
}
_PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}
_CONTEXT_PROJECTIONS = {"add_q_proj": "q", "add_k_proj": "k", "add_v_proj": "v", "to_add_out": "out"}
_FIRST = ("pos_embed.proj", "x_embedder", "proj_in")
_LAST = ("proj_out", "proj_out_2", "out")
_COND_NAMES = ("context_embedder",)
_ADAPTIVE_NORMS = "diffusers.models.normalization"


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, (Attention, AttentionModuleMixin))


def _kind(attn: nn.Module) -> str:
    if getattr(attn, "add_q_proj", None) is not None:
        return "joint"
    return "cross" if getattr(attn, "is_cross_attention", False) else "self"


def _processor_class(attn: nn.Module) -> type[nn.Module] | None:
    """The quantized processor for ``attn``'s current processor (itself if already quantized), else ``None``."""
    current = type(attn.processor)
    if current in QUANT_PROCESSORS.values():
        return current
    return QUANT_PROCESSORS.get(current)


def _below(infos: dict[str, LayerInfo], prefix: str) -> list[LayerInfo]:
    return [info for name, info in infos.items() if name == prefix or name.startswith(prefix + ".")]


class DiffusersTransformerAdapter:
    """Roles of diffusers diffusion transformers (see the module docstring)."""

    name = "diffusers-transformer"
    timestep_argument = "timestep"

    def layers(self, model: nn.Module) -> dict[str, LayerInfo]:
        infos = {n: LayerInfo(n) for n, m in model.named_modules() if type(m) in QUANTIZABLE_TYPES}
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if _is_attention(module):
                kind = _kind(module)
                for sub, role in _PROJECTIONS.items():
                    if prefix + sub in infos:
                        infos[prefix + sub].roles.add(f"attn.{kind}.{role}")
                for sub, role in _CONTEXT_PROJECTIONS.items():
                    if prefix + sub in infos:
                        infos[prefix + sub].roles.add(f"attn.joint.context.{role}")
            elif isinstance(module, FeedForward):
                for info in _below(infos, name):
                    info.roles.add("ff")
            elif isinstance(module, FluxSingleTransformerBlock):
                infos[prefix + "proj_mlp"].roles.add("ff")
                infos[prefix + "proj_out"].roles.update({"ff", "attn.self.out"})
            elif isinstance(module, TimestepEmbedding):
                role = "time_embed" if name.rsplit(".", 1)[-1] == "timestep_embedder" else "cond"
                for info in _below(infos, name):
                    info.roles.add(role)
            elif isinstance(module, PixArtAlphaTextProjection) or name in _COND_NAMES:
                for info in _below(infos, name):
                    info.roles.add("cond")
            elif type(module).__module__ == _ADAPTIVE_NORMS and prefix + "linear" in infos:
                infos[prefix + "linear"].roles.add("time_proj")
        if "proj_out_1" in infos:  # DiT's final adaLN: shift/scale from the timestep (+ class) embedding
            infos["proj_out_1"].roles.add("time_proj")
        for names, role in ((_FIRST, "first"), (_LAST, "last")):
            found = next((n for n in names if n in infos), None)
            if found is not None:
                infos[found].roles.add(role)
        for info in infos.values():
            if not info.roles:
                info.roles.add("other")
        return infos

    def attentions(self, model: nn.Module) -> dict[str, AttentionInfo]:
        found: dict[str, AttentionInfo] = {}
        for name, module in model.named_modules():
            if not _is_attention(module):
                continue
            processor = _processor_class(module)
            if processor is None:
                logger.warning("attention %s uses %s, which questdiff cannot quantize: its matmuls stay in full "
                               "precision", name, type(module.processor).__name__)
                continue
            found[name] = AttentionInfo(name, _kind(module) != "self", processor)
        return found

    def blocks(self, model: nn.Module) -> list[str]:
        return [f"{name}.{i}" for name, child in model.named_children()
                if isinstance(child, nn.ModuleList) and name.endswith("blocks") for i in range(len(child))]

    def to_dict(self) -> dict:
        return {"name": self.name}


@register_adapter(Transformer2DModel)
@register_adapter(DiTTransformer2DModel)
@register_adapter(PixArtTransformer2DModel)
@register_adapter(SD3Transformer2DModel)
@register_adapter(FluxTransformer2DModel)
def _diffusers_transformer() -> DiffusersTransformerAdapter:
    return DiffusersTransformerAdapter()
