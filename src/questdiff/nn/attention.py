"""Quantized attention matmuls for diffusers ``Attention`` through an attention processor.

QuEST quantizes both matmul operands of attention (spec §2.3): q and k before ``q k^T`` (the softmax scale is
applied after, as in the SD/ImageNet code), the softmax output and v before ``P v``. The softmax-output quantizer
has its own bit width (default 8) and an always-zero zero point on an asymmetric range (the official SD code
inherits ``symmetric`` from the activation settings by mistake; not reproduced). The softmax quantizer is per
tensor: its "channel" would be the key-token axis, whose length depends on the resolution.

The q/k/v/out projections are ordinary ``QuantLinear`` layers wrapped separately. With quantization disabled
the processor delegates to the processor it replaced, so outputs are bit-identical to the FP model.

The probabilities are materialised (the quantizer needs them), ``[B*heads, q_tokens, k_tokens]``: at SD-1.5's
4096-token level that is 0.5 GiB per sample in fp32, and autograd would keep several such tensors per layer. When
gradients are on and the tensor is large, the scores -> softmax -> quantize -> ``P v`` core is recomputed in
backward instead (activation checkpointing); the result and gradients are the same.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .quantizer import ActQuantizer

# Probability tensors with at least this many elements (64 MiB in fp32) are recomputed in backward, not stored.
RECOMPUTE_MIN_ELEMENTS = 2**24


class QuantAttnProcessor(nn.Module):
    """Attention processor with fake-quantized q, k, v (``[B*heads, tokens, head_dim]``, channel = head_dim) and
    softmax probabilities (``[B*heads, q_tokens, k_tokens]``).

    Args:
        q_quantizer, k_quantizer, v_quantizer, probs_quantizer: activation quantizers.
        fallback: the processor being replaced, used verbatim when quantization is disabled.
    """

    def __init__(
        self,
        q_quantizer: ActQuantizer,
        k_quantizer: ActQuantizer,
        v_quantizer: ActQuantizer,
        probs_quantizer: ActQuantizer,
        fallback: Any,
    ) -> None:
        super().__init__()
        self.q_quantizer = q_quantizer
        self.k_quantizer = k_quantizer
        self.v_quantizer = v_quantizer
        self.probs_quantizer = probs_quantizer
        self.fallback = fallback

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.q_quantizer, self.k_quantizer, self.v_quantizer, self.probs_quantizer]

    @property
    def enabled(self) -> bool:
        return any(q.enabled for q in self.act_quantizers())

    def set_quant_state(self, act: bool) -> None:
        for q in self.act_quantizers():
            q.enabled = act

    def __call__(  # type: ignore[override]
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.enabled:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self.quantized_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def quantized_attention(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        """diffusers' ``AttnProcessor`` math with quantizers on the matmul operands."""
        return attention_frame(attn, hidden_states, encoder_hidden_states, attention_mask, temb, self._core)

    def _core(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None) -> torch.Tensor:
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        quantizers: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = tuple(self.act_quantizers())
        elements = query.shape[0] * query.shape[1] * key.shape[1]
        if torch.is_grad_enabled() and elements >= RECOMPUTE_MIN_ELEMENTS:
            # the recompute runs after this forward's timestep rows and enabled flags are gone: freeze them now
            probs_like = query.new_empty(()).expand(query.shape[0], query.shape[1], key.shape[1])
            quantizers = tuple(q.frozen(x) for q, x in zip(self.act_quantizers(), (query, key, value, probs_like)))
            hidden_states = checkpoint(_attend, attn, query, key, value, attention_mask, quantizers, use_reentrant=False)
        else:
            hidden_states = _attend(attn, query, key, value, attention_mask, quantizers)
        return attn.batch_to_head_dim(hidden_states)


Core = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def attention_frame(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                    attention_mask: torch.Tensor | None, temb: torch.Tensor | None, core: Core) -> torch.Tensor:
    """diffusers' ``AttnProcessor`` around ``core(attn, query, key, value, attention_mask)``: the norms, the q/k/v
    projections (``[B, tokens, heads * head_dim]``), the output projection, residual and rescale. ``core`` returns
    the attended values in the projections' layout; the fake-quant and the deployed processors differ only there."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch_size, sequence_length, _ = context.shape
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    hidden_states = core(attn, query, key, value, attention_mask)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _attend(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
            quantizers: tuple[Callable[[torch.Tensor], torch.Tensor], ...]) -> torch.Tensor:
    """``quant(softmax(quant(q) quant(k)^T * scale)) quant(v)`` for ``[B*heads, tokens, head_dim]`` operands;
    ``quantizers`` apply to q, k, v and the probabilities, in that order."""
    q_quant, k_quant, v_quant, probs_quant = quantizers
    probs = attn.get_attention_scores(q_quant(query), k_quant(key), attention_mask)
    return torch.bmm(probs_quant(probs), v_quant(value))
