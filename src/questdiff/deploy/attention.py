"""Deployed attention: the fake-quant processors' formats on int8 codes, for every attention flavour the adapters
quantize (diffusers ``Attention``, SD3 joint attention, FLUX attention, intercepted SDPA calls).

- "qk" format: q and k codes on their static symmetric grids (k centred on its token mean first, as the fake-quant
  model does), one pass over the keys with ``q kᵀ`` as an int8 dot, online softmax and ``P v`` in ``v``'s dtype
  (``kernels/triton_attention.attention_qk``).
- "qkvp" format: q, k, v and the softmax output on their static 8-bit grids, ``q kᵀ`` and ``P v`` as int8 dots in the
  two-pass kernel (``kernels/triton_attention.attention``).

Each flavour runs the same frame as its fake-quant twin (``attention_frame``, ``joint_attention_frame``,
``flux_attention_frame``, SDPA's arguments) around ``DeployedOperands.compute``, so the deployed model computes what
the fake-quant model computes. Attention masks and per-channel grids (4-bit q/k/v in the "qkvp" format) have no
kernel: they run the same math in torch on dequantized values (simulated).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import ops
from ..nn.attention import attention_frame, centre_keys
from ..nn.attention_joint import flux_attention_frame, joint_attention_frame
from ..nn.sdpa import sdpa_arguments
from .layers import BACKENDS, Backend
from .operand import ActTable

OPERANDS = ("q", "k", "v", "probs")


class DeployedOperands(nn.Module):
    """The deployed twin of ``OperandQuantizers``: the static tables of one attention's matmul operands and
    ``compute`` on ``[B, heads, tokens, d]`` operands; each attention flavour's processor is a small subclass that
    runs the flavour's frame around ``compute`` (as its fake-quant twin runs the same frame around its quantizers).

    Args:
        tables: ``ActTable`` of q and k (and, in the "qkvp" format, of v and the probabilities): ``[T, 1]`` or
            ``[T, head_dim]`` (q/k/v), ``[T, 1]`` (probabilities).
        probs_max: the top integer of the probability grid (``2^bits - 1``; its zero point is 0); ``None`` in the
            "qk" format.
        backend: ``"auto"`` / ``"triton"`` / ``"reference"``.
    """

    kind = "operands"

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
        return {"kind": self.kind, "format": self.format, "probs_max": self.probs_max,
                "tables": {name: t.spec() for name, t in self.tables().items()}}

    @property
    def runs_kernels(self) -> bool:
        grids = all(t.per_tensor and t.fits_int8 for name, t in self.tables().items() if name != "probs")
        return grids and (self.probs_max is None or self.probs_max <= 255)

    @property
    def grid_head_dim(self) -> int | None:
        """The head dim q's grid was made for (per-channel grids), else ``None``."""
        return None if self.q.per_tensor else self.q.scale.shape[1]

    def compute(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                scale: float | None = None) -> torch.Tensor:
        """Attention of ``[B, heads, tokens, d]`` operands -> ``[B, heads, q_tokens, d]`` on the codes (``mask``: SDPA's,
        boolean with True = attend or additive, broadcastable to ``[B, heads, q_tokens, k_tokens]``; ``scale``
        defaults to ``d^-0.5``). Masked attention runs simulated."""
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, L, H, D] views, the kernels' layout
        if self.format == "qk":
            k = centre_keys(k, token_dim=1)  # mean over the key tokens, per sample, head and channel
        if self.runs_kernels and mask is None:
            out = self._kernel(q, k, v, scale)
        else:
            out = self._simulated(q, k, v, scale, mask)
        return out.transpose(1, 2)

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
                   mask: torch.Tensor | None) -> torch.Tensor:
        """The fake-quant attention in torch, on ``[B, L, H, D]`` operands."""
        qf, kf = (t.fake_quantize(x, -1).float() for t, x in ((self.q, q), (self.k, k)))
        vf = (v if self.v is None else self.v.fake_quantize(v, -1)).float()
        scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * sm_scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        probs = scores.softmax(dim=-1)
        if self.probs is not None:
            probs = self.probs.fake_quantize(probs, -1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)

    def extra_repr(self) -> str:
        mode = "kernels" if self.runs_kernels else "simulated"
        return f"format={self.format}, probs_max={self.probs_max}, backend={self.backend}, {mode}"


class DeployedAttnProcessor(DeployedOperands):
    """diffusers ``Attention`` (UNets, DiT, PixArt): ``attention_frame`` around ``compute``."""

    kind = "attn"

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
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in (query, key, value))  # [B, L, H, D]
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        mask = None  # diffusers' additive [B * heads, 1 | Lq, Lk] -> [B, heads, 1 | Lq, Lk]
        if attention_mask is not None:
            mask = attention_mask.reshape(q.shape[0], heads, *attention_mask.shape[1:])
        out = self.compute(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, attn.scale)
        return out.transpose(1, 2).flatten(2).to(query.dtype)


class DeployedJointAttnProcessor(DeployedOperands):
    """SD3 / SD3.5 joint attention: ``joint_attention_frame`` around ``compute``."""

    kind = "joint"

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,  # type: ignore[override]
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        return joint_attention_frame(attn, hidden_states, encoder_hidden_states, self.compute)


class DeployedFluxAttnProcessor(DeployedOperands):
    """FLUX double- and single-stream attention: ``flux_attention_frame`` (rotary embedding first) around
    ``compute``."""

    kind = "flux"

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,  # type: ignore[override]
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        return flux_attention_frame(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    self.compute)


class DeployedSite(DeployedOperands):
    """An intercepted ``F.scaled_dot_product_attention`` call (``nn/sdpa.py``'s ``AttentionSite``), deployed: the SDPA
    semantics (``attn_mask``, ``is_causal``, ``scale``, ``enable_gqa``) around ``compute``; dropout is refused."""

    kind = "sdpa"

    def attend(self, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        a = sdpa_arguments(args, kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        if float(a.get("dropout_p", 0.0)) > 0.0:
            raise ValueError("a deployed attention call takes no dropout: run the model in eval mode (dropout_p=0)")
        if a.get("enable_gqa", False):
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        mask = a.get("attn_mask")
        if a.get("is_causal", False):
            mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        return self.compute(query, key, value, mask, a.get("scale"))


PROCESSORS: dict[str, type[DeployedOperands]] = {cls.kind: cls for cls in (DeployedAttnProcessor,
                                                 DeployedJointAttnProcessor, DeployedFluxAttnProcessor, DeployedSite)}
