"""Quantized attention matmuls for the attention flavours of diffusion transformers (SD3 joint attention, FLUX
double- and single-stream attention with rotary embeddings).

Same treatment as ``QuantAttnProcessor``, in either format (``nn/attention.py``): q and k are fake-quantized before
``q k^T`` (the softmax scale ``head_dim^-0.5`` is applied after the product), and in the "qkvp" format the softmax
output (per tensor, zero point 0) and v before ``P v``. In joint attention the image and context tokens are concatenated before
the matmuls, so one quantizer covers each concatenated operand, as a kernel would see it; rotary embeddings are
applied before quantization (the rotated q and k are the operands). The q/k/v/out projections (``to_q``,
``add_q_proj``, ``to_add_out``...) are ordinary ``QuantLinear`` layers wrapped separately.

With quantization disabled each processor delegates to the processor it replaced, so outputs are bit-identical to
the FP model. Operands are ``[B, heads, tokens, head_dim]`` (per-sample timestep rows index dim 0 = the batch).
Large probability tensors are recomputed in backward instead of stored, as in ``QuantAttnProcessor``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import RECOMPUTE_MIN_ELEMENTS, OperandQuantizers, Quantize
from .quantizer import ActQuantizer


def quantized_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, quantizers: OperandQuantizers,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``quant(softmax(quant(q) quant(k)^T * d^-0.5 + mask)) quant(v)`` for ``[B, heads, tokens, d]`` operands, in
    ``quantizers``' format; returns ``[B, heads, q_tokens, d]``. ``attention_mask`` follows
    ``scaled_dot_product_attention``: boolean (True = attend) or additive, broadcastable to the scores."""
    probs_shape = (*query.shape[:3], key.shape[2])
    if torch.is_grad_enabled() and math.prod(probs_shape) >= RECOMPUTE_MIN_ELEMENTS:
        frozen = quantizers.operand_functions(query, key, value, probs_shape)
        return checkpoint(_attend, query, key, value, attention_mask, frozen, use_reentrant=False)
    return _attend(query, key, value, attention_mask, quantizers.operand_functions(query, key, value))


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
            quantizers: tuple[Quantize, ...]) -> torch.Tensor:
    q_quant, k_quant, v_quant, probs_quant = quantizers
    scores = (q_quant(query) @ k_quant(key).transpose(-1, -2)).float() * query.shape[-1] ** -0.5
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = scores.softmax(dim=-1).to(value.dtype)
    return probs_quant(probs) @ v_quant(value)


class _QuantOperandsProcessor(OperandQuantizers):
    """The operand quantizers (``OperandQuantizers``) and the processor they replace (``fallback``, used verbatim
    while every quantizer is disabled)."""

    def __init__(self, q_quantizer: ActQuantizer, k_quantizer: ActQuantizer, v_quantizer: ActQuantizer | None,
                 probs_quantizer: ActQuantizer | None, fallback: Any) -> None:
        super().__init__(q_quantizer, k_quantizer, v_quantizer, probs_quantizer)
        self.fallback = fallback


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def joint_attention_frame(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                          attend: Attend) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """diffusers ``JointAttnProcessor2_0`` (SD3 / SD3.5 MMDiT) around ``attend(q, k, v, mask)`` on ``[B, heads,
    tokens, d]`` operands: image tokens first, then the context tokens of ``add_{q,k,v}_proj``; without
    ``encoder_hidden_states`` (SD3.5's second attention) plain self-attention. The fake-quant and the deployed
    processors differ only in ``attend``."""
    image_tokens = hidden_states.shape[1]
    query, key, value = _heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if encoder_hidden_states is not None:
        c_query, c_key, c_value = _heads(attn, attn.add_q_proj(encoder_hidden_states),
                                         attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)
        query, key, value = (torch.cat([x, c], dim=2) for x, c in ((query, c_query), (key, c_key), (value, c_value)))
    # JointAttnProcessor2_0 ignores attention_mask as well
    out = attend(query, key, value, None)
    out = out.transpose(1, 2).flatten(2).to(query.dtype)
    if encoder_hidden_states is not None:
        out, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
    out = attn.to_out[1](attn.to_out[0](out))
    return (out, context) if encoder_hidden_states is not None else out


def flux_attention_frame(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                         attention_mask: torch.Tensor | None, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
                         attend: Attend) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """diffusers ``FluxAttnProcessor`` (FLUX double-stream blocks: context tokens first, then image tokens; single
    stream blocks: one sequence, no output projection) around ``attend(q, k, v, mask)``, the rotary embedding
    applied before it (the rotated q and k are the operands)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attn, "fused_projections", False):
        raise ValueError("quantized FLUX attention needs separate q/k/v projections: call "
                         "transformer.unfuse_qkv_projections() before questdiff.quantize")
    split = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in split)  # [B, tokens, heads, d]
    query, key = attn.norm_q(query), attn.norm_k(key)
    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if joint:
        split = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                 attn.add_v_proj(encoder_hidden_states))
        c_query, c_key, c_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in split)
        c_query, c_key = attn.norm_added_q(c_query), attn.norm_added_k(c_key)
        query, key, value = (torch.cat([c, x], dim=1) for c, x in ((c_query, query), (c_key, key), (c_value, value)))
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
    out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return out
    context_tokens = encoder_hidden_states.shape[1]
    context, out = out[:, :context_tokens], out[:, context_tokens:]
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(context.contiguous())


class QuantJointAttnProcessor(_QuantOperandsProcessor):
    """``joint_attention_frame`` with fake-quantized matmul operands (SD3 / SD3.5 joint attention)."""

    def __call__(  # type: ignore[override]
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        return joint_attention_frame(attn, hidden_states, encoder_hidden_states, self._attend)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        return quantized_sdpa(query, key, value, self, mask)


class QuantFluxAttnProcessor(_QuantOperandsProcessor):
    """``flux_attention_frame`` with fake-quantized matmul operands (FLUX double- and single-stream attention)."""

    def __call__(  # type: ignore[override]
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return flux_attention_frame(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    self._attend)

    _attend = QuantJointAttnProcessor._attend


def _heads(attn: nn.Module, *projections: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[B, tokens, heads * d]`` projections -> ``[B, heads, tokens, d]``."""
    return tuple(x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in projections)
