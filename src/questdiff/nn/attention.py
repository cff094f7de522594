"""Quantized attention matmuls for diffusers ``Attention`` through an attention processor, and the operand
quantizers every quantized attention flavour shares (``OperandQuantizers``).

Two formats (``QuantConfig.attention``), each the exact simulation of a deployed kernel ("calibrate what you
deploy", DESIGN §5):

- ``"qk"`` (default): q and k on symmetric static 8-bit per-tensor grids with per-timestep scales, k first centred on
  its mean over the key tokens (``centre_keys``: every query's scores shift by one constant, so the softmax is
  unchanged, while k's per-channel offsets no longer stretch its grid; SageAttention's smoothing). The softmax and
  ``P v`` stay in floating point: the single-pass 8-bit kernel (``kernels/triton_attention.py``) runs ``q kᵀ`` on
  int8 codes and ``P v`` in the model's 16-bit dtype, as flash attention does.
- ``"qkvp"`` (QuEST, spec §2.3): q and k quantized before ``q k^T`` (the softmax scale is applied after, as in the
  SD/ImageNet code), the softmax output and v before ``P v``. The softmax-output quantizer has its own bit width
  (default 8) and an always-zero zero point on an asymmetric range (the official SD code inherits ``symmetric``
  from the activation settings by mistake; not reproduced); it is per tensor: its "channel" would be the key-token
  axis, whose length depends on the resolution. Its kernel needs two passes over the keys (the probabilities are
  quantized after normalisation).

The q/k/v/out projections are ordinary ``QuantLinear`` layers wrapped separately. With quantization disabled
the processor delegates to the processor it replaced, so outputs are bit-identical to the FP model.

The probabilities are materialised, ``[B*heads, q_tokens, k_tokens]``: at SD-1.5's 4096-token level that is 0.5 GiB
per sample in fp32, and autograd would keep several such tensors per layer. When gradients are on and the tensor is
large, the scores -> softmax -> quantize -> ``P v`` core is recomputed in backward instead (activation
checkpointing); the result and gradients are the same.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .quantizer import ActQuantizer

# Probability tensors with at least this many elements (64 MiB in fp32) are recomputed in backward, not stored.
RECOMPUTE_MIN_ELEMENTS = 2**24


Quantize = Callable[[torch.Tensor], torch.Tensor]


def centre_keys(key: torch.Tensor, token_dim: int = -2) -> torch.Tensor:
    """``key`` (``[..., tokens, d]`` by default) minus its mean over the tokens, computed in fp32: the "qk" format's
    smoothing. Deployed and fake-quant attention both call this, so both quantize the same values."""
    return key - key.float().mean(dim=token_dim, keepdim=True).to(key.dtype)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class OperandQuantizers(nn.Module):
    """The activation quantizers of one attention's matmul operands: q and k (``[T, 1]`` or ``[T, head_dim]``
    scales), and in the "qkvp" format v and the softmax probabilities (per tensor, zero point 0); in the "qk"
    format ``v_quantizer`` and ``probs_quantizer`` are ``None`` and k is centred before its quantizer."""

    def __init__(self, q_quantizer: ActQuantizer, k_quantizer: ActQuantizer, v_quantizer: ActQuantizer | None,
                 probs_quantizer: ActQuantizer | None) -> None:
        super().__init__()
        if (v_quantizer is None) != (probs_quantizer is None):
            raise ValueError("give both the v and the probability quantizer (the 'qkvp' format) or neither ('qk')")
        self.q_quantizer = q_quantizer
        self.k_quantizer = k_quantizer
        self.v_quantizer = v_quantizer
        self.probs_quantizer = probs_quantizer

    @property
    def format(self) -> str:
        return "qk" if self.probs_quantizer is None else "qkvp"

    def act_quantizers(self) -> list[ActQuantizer]:
        return [q for q in (self.q_quantizer, self.k_quantizer, self.v_quantizer, self.probs_quantizer) if q is not None]

    @property
    def enabled(self) -> bool:
        return any(q.enabled for q in self.act_quantizers())

    def set_quant_state(self, act: bool) -> None:
        for q in self.act_quantizers():
            q.enabled = act

    def operand_functions(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          probs_shape: tuple[int, ...] | None = None) -> tuple[Quantize, Quantize, Quantize, Quantize]:
        """What to apply to q, k, v and the probabilities. With ``probs_shape`` (the recompute-in-backward path),
        each is frozen now (``ActQuantizer.frozen``): the recompute runs after this forward's timestep rows and
        enabled flags are gone."""
        def one(quantizer: ActQuantizer | None, like: torch.Tensor) -> Quantize:
            if quantizer is None:
                return _identity
            return quantizer if probs_shape is None else quantizer.frozen(like)

        probs_like = query.new_empty(()).expand(*probs_shape) if probs_shape is not None else query
        k_quant = one(self.k_quantizer, key)
        if self.format == "qk" and self.k_quantizer.enabled:
            k_quant = _Centred(k_quant)
        return (one(self.q_quantizer, query), k_quant, one(self.v_quantizer, value),
                one(self.probs_quantizer, probs_like))


class _Centred:
    """``quantize(centre_keys(x))``: the "qk" format's k operand (a class, not a closure: recomputed in backward)."""

    def __init__(self, quantize: Quantize) -> None:
        self.quantize = quantize

    def __call__(self, key: torch.Tensor) -> torch.Tensor:
        return self.quantize(centre_keys(key))


class QuantAttnProcessor(OperandQuantizers):
    """Attention processor with fake-quantized matmul operands: q, k, v (``[B*heads, tokens, head_dim]``, channel =
    head_dim) and softmax probabilities (``[B*heads, q_tokens, k_tokens]``), in either format.

    Args:
        q_quantizer, k_quantizer, v_quantizer, probs_quantizer: activation quantizers (v and probs ``None``: "qk").
        fallback: the processor being replaced, used verbatim when quantization is disabled.
    """

    def __init__(
        self,
        q_quantizer: ActQuantizer,
        k_quantizer: ActQuantizer,
        v_quantizer: ActQuantizer | None,
        probs_quantizer: ActQuantizer | None,
        fallback: Any,
    ) -> None:
        super().__init__(q_quantizer, k_quantizer, v_quantizer, probs_quantizer)
        self.fallback = fallback

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

        probs_shape = (query.shape[0], query.shape[1], key.shape[1])
        if torch.is_grad_enabled() and math.prod(probs_shape) >= RECOMPUTE_MIN_ELEMENTS:
            quantizers = self.operand_functions(query, key, value, probs_shape)
            hidden_states = checkpoint(_attend, attn, query, key, value, attention_mask, quantizers, use_reentrant=False)
        else:
            hidden_states = _attend(attn, query, key, value, attention_mask, self.operand_functions(query, key, value))
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
            quantizers: tuple[Quantize, ...]) -> torch.Tensor:
    """``quant(softmax(quant(q) quant(k)^T * scale)) quant(v)`` for ``[B*heads, tokens, head_dim]`` operands;
    ``quantizers`` apply to q, k, v and the probabilities, in that order (``OperandQuantizers.operand_functions``)."""
    q_quant, k_quant, v_quant, probs_quant = quantizers
    probs = attn.get_attention_scores(q_quant(query), k_quant(key), attention_mask)
    return torch.bmm(probs_quant(probs), v_quant(value))
