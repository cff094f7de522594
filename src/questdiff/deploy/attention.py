"""Deployed attention processor for diffusers ``Attention``: the fake-quant processor's format on int8 codes.

- "qk" format: q and k codes on their static symmetric grids (k centred on its token mean first, as the fake-quant
  model does), one pass over the keys with ``q kᵀ`` as an int8 dot, online softmax and ``P v`` in ``v``'s dtype
  (``kernels/triton_attention.attention_qk``).
- "qkvp" format: q, k, v and the softmax output on their static 8-bit grids, ``q kᵀ`` and ``P v`` as int8 dots in the
  two-pass kernel (``kernels/triton_attention.attention``).

It mirrors ``nn/attention.py``'s ``QuantAttnProcessor`` (diffusers' ``AttnProcessor`` math) step for step, so the
deployed model computes what the fake-quant model computes. Attention masks and per-channel grids (4-bit q/k/v in the
"qkvp" format) have no kernel: they run the same math in torch on dequantized values (simulated).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import ops
from ..nn.attention import attention_frame, centre_keys
from .layers import BACKENDS, Backend
from .operand import ActTable

OPERANDS = ("q", "k", "v", "probs")


class DeployedAttnProcessor(nn.Module):
    """Attention processor on int8 codes.

    Args:
        tables: ``ActTable`` of q and k (and, in the "qkvp" format, of v and the probabilities): ``[T, 1]`` or
            ``[T, head_dim]`` (q/k/v), ``[T, 1]`` (probabilities).
        probs_max: the top integer of the probability grid (``2^bits - 1``; its zero point is 0); ``None`` in the
            "qk" format.
        backend: ``"auto"`` / ``"triton"`` / ``"reference"``.
    """

    def __init__(self, tables: dict[str, ActTable], probs_max: int | None, backend: Backend) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        self.format = "qkvp" if "probs" in tables else "qk"
        if (self.format == "qkvp") != (probs_max is not None):
            raise ValueError("the probability grid (probs_max) comes with the 'qkvp' format's v and probability tables")
        for name in OPERANDS:
            setattr(self, name, tables.get(name))
        self.probs_max = probs_max
        self.backend = backend

    def tables(self) -> dict[str, ActTable]:
        return {name: getattr(self, name) for name in OPERANDS if getattr(self, name) is not None}

    def spec(self) -> dict[str, Any]:
        return {"format": self.format, "probs_max": self.probs_max,
                "tables": {name: t.spec() for name, t in self.tables().items()}}

    @property
    def runs_kernels(self) -> bool:
        grids = all(t.per_tensor and t.fits_int8 for name, t in self.tables().items() if name != "probs")
        return grids and (self.probs_max is None or self.probs_max <= 255)

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
        return attention_frame(attn, hidden_states, encoder_hidden_states, attention_mask, temb, self._core)

    def _core(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None) -> torch.Tensor:
        heads = attn.heads
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, t.shape[2] // heads) for t in (query, key, value))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        if self.format == "qk":
            k = centre_keys(k, token_dim=1)  # mean over the key tokens, per sample, head and channel
        if self.runs_kernels and attention_mask is None:
            out = self._kernel(q, k, v, attn.scale)
        else:
            out = self._simulated(q, k, v, attn.scale, attention_mask, heads)
        return out.reshape(out.shape[0], out.shape[1], -1).to(query.dtype)

    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
        use_triton = ops.triton_runs_on(q.device, self.backend)
        rows = self.q.rows(q.device)
        if self.format == "qk":
            q_codes, k_codes = (t.tokens(x, False, False, use_triton)[0] for t, x in ((self.q, q), (self.k, k)))
            return ops.attention_qk(q_codes, k_codes, v, self.q.scale[:, 0], self.k.scale[:, 0], rows, float(sm_scale),
                                    q.dtype, use_triton)
        codes = [t.tokens(x, False, False, use_triton)[0] for t, x in zip((self.q, self.k, self.v), (q, k, v))]
        tables = (self.q, self.k, self.v, self.probs)
        scales = torch.stack([t.scale[:, 0] for t in tables], dim=1)
        offsets = torch.stack([t.offset[:, 0] for t in tables], dim=1)
        return ops.attention(*codes, scales, offsets, rows, float(sm_scale), self.probs_max, q.dtype, use_triton)

    def _simulated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                   mask: torch.Tensor | None, heads: int) -> torch.Tensor:
        """The fake-quant attention in torch, on ``[B, L, H, D]`` operands."""
        qf, kf = (t.fake_quantize(x, -1).float() for t, x in ((self.q, q), (self.k, k)))
        vf = (v if self.v is None else self.v.fake_quantize(v, -1)).float()
        scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * sm_scale
        if mask is not None:  # diffusers' [B * heads, 1 | Lq, Lk]
            scores = scores + mask.reshape(q.shape[0], heads, *mask.shape[1:]).float()
        probs = scores.softmax(dim=-1)
        if self.probs is not None:
            probs = self.probs.fake_quantize(probs, -1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, vf)

    def extra_repr(self) -> str:
        mode = "kernels" if self.runs_kernels else "simulated"
        return f"format={self.format}, probs_max={self.probs_max}, backend={self.backend}, {mode}"
