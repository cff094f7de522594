"""Deployed attention processor for diffusers ``Attention``: q, k, v and the softmax output on their static 8-bit
grids, with ``q kᵀ`` and ``P v`` as int8 dots in one kernel (``kernels/triton_attention.py``).

It mirrors ``nn/attention.py``'s ``QuantAttnProcessor`` (diffusers' ``AttnProcessor`` math) step for step, so the
deployed model computes what the fake-quant model computes. Attention masks and per-channel grids (4-bit q/k/v)
have no kernel: they run the same math in torch on dequantized values (simulated).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import ops
from .layers import BACKENDS, Backend
from .operand import ActTable

OPERANDS = ("q", "k", "v", "probs")


class DeployedAttnProcessor(nn.Module):
    """Attention processor on int8 codes.

    Args:
        tables: ``ActTable`` of q, k, v (``[T, 1]`` or ``[T, head_dim]``) and of the probabilities (``[T, 1]``).
        probs_max: the top integer of the probability grid (``2^bits - 1``; its zero point is 0).
        backend: ``"auto"`` / ``"triton"`` / ``"reference"``.
    """

    def __init__(self, tables: dict[str, ActTable], probs_max: int, backend: Backend) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        self.q, self.k, self.v, self.probs = (tables[name] for name in OPERANDS)
        self.probs_max = probs_max
        self.backend = backend

    def spec(self) -> dict[str, Any]:
        return {"probs_max": self.probs_max, "tables": {name: getattr(self, name).spec() for name in OPERANDS}}

    @property
    def runs_kernels(self) -> bool:
        return all(t.per_tensor and t.fits_int8 for t in (self.q, self.k, self.v)) and self.probs_max <= 255

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
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

        heads = attn.heads
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, t.shape[2] // heads) for t in (query, key, value))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        if self.runs_kernels and attention_mask is None:
            out = self._kernel(q, k, v, attn.scale)
        else:
            out = self._simulated(q, k, v, attn.scale, attention_mask, heads)
        hidden_states = out.reshape(out.shape[0], out.shape[1], -1).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
        use_triton = ops.triton_runs_on(q.device, self.backend)
        codes = [t.codes(x, use_triton) for t, x in zip((self.q, self.k, self.v), (q, k, v))]
        tables = (self.q, self.k, self.v, self.probs)
        scales = torch.stack([t.scale[:, 0] for t in tables], dim=1)
        offsets = torch.stack([t.offset[:, 0] for t in tables], dim=1)
        return ops.attention(*codes, scales, offsets, self.q.row(q.device), float(sm_scale), self.probs_max, q.dtype,
                             use_triton)

    def _simulated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                   mask: torch.Tensor | None, heads: int) -> torch.Tensor:
        """The fake-quant attention in torch, on ``[B, L, H, D]`` operands."""
        qf, kf, vf = (t.fake_quantize(x, -1).float() for t, x in zip((self.q, self.k, self.v), (q, k, v)))
        scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * sm_scale
        if mask is not None:  # diffusers' [B * heads, 1 | Lq, Lk]
            scores = scores + mask.reshape(q.shape[0], heads, *mask.shape[1:]).float()
        probs = self.probs.fake_quantize(scores.softmax(dim=-1), -1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, vf)

    def extra_repr(self) -> str:
        mode = "kernels" if self.runs_kernels else "simulated"
        return f"probs_max={self.probs_max}, backend={self.backend}, {mode}"
