"""Quantized ``F.scaled_dot_product_attention`` calls of denoisers that are not built from diffusers ``Attention``.

Such a model computes attention by calling ``torch.nn.functional.scaled_dot_product_attention`` somewhere in its
own modules. QuEST quantizes the operands of both attention matmuls (spec §2.3), so each call gets the quantizers of
``QuantAttnProcessor``: q, k, v per ``head_dim`` channel (``[..., tokens, head_dim]``, channel dim -1) and the
softmax output per tensor with a zero point of 0, each with per-timestep rows.

How calls are found: the generic adapter traces one forward and records, for each call, the innermost module that
made it (its "owner") and the operands' ``head_dim``. ``install_sdpa_quantizers`` gives each call its own
``AttentionSite`` and hooks the owner modules: while an owner runs, a ``TorchFunctionMode`` (active only inside
owners, so the rest of the model runs at full speed) routes its SDPA calls to the site of the same owner and call
index. Assumption: every run of an owner makes the same SDPA calls, in the same order, as in the traced forward (a
module called several times per forward reuses its sites on each run); a run that makes more or fewer calls raises
``AttentionCallError`` instead of quantizing a call with another call's scales.

With the quantizers disabled a call runs the original SDPA, bit for bit. Enabled, it computes
``dropout(quant(softmax(quant(q) quant(k)^T * scale + mask))) quant(v)`` with the SDPA semantics (``attn_mask``,
``is_causal``, ``scale``, ``enable_gqa``); large probability tensors are recomputed in backward, as in
``QuantAttnProcessor``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from .attention import RECOMPUTE_MIN_ELEMENTS, OperandQuantizers

SDPA_ATTR = "questdiff_sdpa"
SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class AttentionCallError(RuntimeError):
    """An attention call does not match the traced forward the quantizers were made for."""


def sdpa_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of one ``F.scaled_dot_product_attention(*args, **kwargs)`` call by name."""
    bound = dict(zip(SDPA_ARGUMENTS, args))
    bound.update(kwargs)
    return bound


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
            dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
            quantizers: tuple[Callable[[torch.Tensor], torch.Tensor], ...]) -> torch.Tensor:
    """SDPA on ``[..., heads, tokens, dim]`` operands with ``quantizers`` applied to q, k, v and the probabilities."""
    q_quant, k_quant, v_quant, probs_quant = quantizers
    query, key, value = q_quant(query), k_quant(key), v_quant(value)
    if enable_gqa:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = probs_quant(torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype))
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs @ value


class AttentionSite(OperandQuantizers):
    """The quantizers of one SDPA call (``OperandQuantizers``: q, k and, in the "qkvp" format, v and the softmax
    probabilities; q/k/v ``[..., tokens, head_dim]``, channel = head_dim). ``QuantSDPA`` routes calls to any site
    with ``attend`` and ``grid_head_dim`` (the deployed ``DeployedSite`` too)."""

    @property
    def grid_head_dim(self) -> int | None:
        """The head dim q's grid was made for (per-channel grids), else ``None``."""
        return self.q_quantizer.scale.shape[1] if self.q_quantizer.per_channel else None

    def attend(self, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        """Run the SDPA call ``F.scaled_dot_product_attention(*args, **kwargs)`` with this site's quantizers."""
        if not self.enabled:
            return F.scaled_dot_product_attention(*args, **kwargs)
        a = sdpa_arguments(args, kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        options = (a.get("attn_mask"), float(a.get("dropout_p", 0.0)), bool(a.get("is_causal", False)), a.get("scale"),
                   bool(a.get("enable_gqa", False)))
        probs_shape = (*query.shape[:-1], key.shape[-2])
        if torch.is_grad_enabled() and math.prod(probs_shape) >= RECOMPUTE_MIN_ELEMENTS:
            quantizers = self.operand_functions(query, key, value, probs_shape)
            return checkpoint(_attend, query, key, value, *options, quantizers, use_reentrant=False)
        return _attend(query, key, value, *options, self.operand_functions(query, key, value))


class QuantSDPA(nn.Module):
    """Every quantized SDPA call of a denoiser (attached to it as ``questdiff_sdpa``): ``sites[i]`` serves the
    ``index[i]``-th call of each run of module ``owners[i]`` (``""``: the denoiser's own forward)."""

    def __init__(self, owners: Sequence[str], sites: Sequence[nn.Module]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self.owners = list(owners)
        self._by_owner: dict[str, list[int]] = {}
        for i, owner in enumerate(self.owners):
            self._by_owner.setdefault(owner, []).append(i)
        self._stack: list[str | None] = []  # owners running now, innermost last (None: a module whose calls pass)
        self._calls: dict[str, int] = {}
        self._mode: _RouteSDPA | None = None

    def enter(self, owner: str | None) -> None:
        if not self._stack:
            self._mode = _RouteSDPA(self)
            self._mode.__enter__()
        self._stack.append(owner)
        if owner is not None:
            self._calls[owner] = 0

    def exit(self, owner: str | None, finished: bool) -> None:
        """Leave ``owner``; when its run ``finished`` (no exception), check it made all its traced calls."""
        self._stack.pop()
        if not self._stack and self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if finished and owner is not None and self._calls[owner] != len(self._by_owner[owner]):
            raise AttentionCallError(self._mismatch(owner, self._calls[owner]))

    def call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        owner = self._stack[-1]
        if owner is None:
            return F.scaled_dot_product_attention(*args, **kwargs)
        index = self._calls[owner]
        self._calls[owner] = index + 1
        sites = self._by_owner[owner]
        if index >= len(sites):
            raise AttentionCallError(self._mismatch(owner, index + 1))
        site = self.sites[sites[index]]
        head_dim = site.grid_head_dim
        query = sdpa_arguments(args, kwargs)["query"]
        if head_dim is not None and query.shape[-1] != head_dim:
            raise AttentionCallError(f"{self._name(owner)}'s attention call {index} has head_dim {query.shape[-1]}, traced "
                                     f"{head_dim}: {self._advice}")
        return site.attend(args, kwargs)

    _advice = ("questdiff quantizes scaled_dot_product_attention calls by their order within each module's run, as "
               "traced on a calibration row; quantize with calibration data whose calls match the ones sampled")

    @staticmethod
    def _name(owner: str) -> str:
        return repr(owner) if owner else "the denoiser's forward"

    def _mismatch(self, owner: str, count: int) -> str:
        return (f"{self._name(owner)} made {count} scaled_dot_product_attention call(s) in this run; its traced run made "
                f"{len(self._by_owner[owner])}: {self._advice}")


class _RouteSDPA(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` calls to ``QuantSDPA.call``; everything else runs unchanged."""

    def __init__(self, router: QuantSDPA) -> None:
        super().__init__()
        self.router = router

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.scaled_dot_product_attention:
            return self.router.call(args, kwargs or {})
        return func(*args, **(kwargs or {}))


class _Enter:
    """Forward pre-hook of an owner (plain class, not a closure: deep copies and pickles of the model route their own
    ``QuantSDPA``, which the copy of this hook references)."""

    def __init__(self, router: QuantSDPA, owner: str | None) -> None:
        self.router, self.owner = router, owner

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.router.enter(self.owner)


class _Exit(_Enter):
    """Forward hook (``always_call``: it also runs when the forward raises, with ``output`` None)."""

    def __call__(self, module: nn.Module, args: tuple, output: Any = None) -> None:  # type: ignore[override]
        self.router.exit(self.owner, finished=output is not None)


def install_sdpa_quantizers(model: nn.Module, owners: Sequence[str], sites: Sequence[nn.Module],
                            passthrough: Iterable[str] = ()) -> QuantSDPA:
    """Attach ``QuantSDPA(owners, sites)`` to ``model`` and hook the owner modules. Calls made inside the
    ``passthrough`` modules (attention modules quantized otherwise, e.g. by a ``QuantAttnProcessor``) run unchanged."""
    router = QuantSDPA(owners, sites)
    model.add_module(SDPA_ATTR, router)
    hooked: list[tuple[str, str | None]] = [(o, o) for o in dict.fromkeys(owners)]
    hooked += [(p, None) for p in passthrough if any(o == "" or p.startswith(o + ".") for o in owners)]
    for name, owner in hooked:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_Enter(router, owner))
        module.register_forward_hook(_Exit(router, owner), always_call=True)
    return router
