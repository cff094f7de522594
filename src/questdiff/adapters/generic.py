"""Adapter for any ``nn.Module`` denoiser that is not from diffusers.

The user names the timestep argument of ``forward`` and, optionally, selectors for roles. A selector is a module
name (exact, or a glob such as ``"blocks.*.time_mlp"``, or a regex written ``"re:<pattern>"``), a module type, or
a predicate ``(name, module) -> bool``.

Everything else comes from one traced forward (``trace``; ``quantize`` runs it on a calibration row before
``prepare``): the Linear/Conv/ConvTranspose layers the forward calls are quantized (role ``other`` unless
selected), every layer that reads the model's sample tensor gets ``first`` and the layer(s) producing its output
get ``last`` (time/conditioning-embedding layers excluded), and the reconstruction blocks are the called modules
holding layers (children of ``ModuleList``-like containers), and every ``F.scaled_dot_product_attention`` call gets
quantized q/k/v/softmax (``questdiff.nn.sdpa``; a softmax computed by hand is named in a warning, its matmuls stay
FP). diffusers ``Attention`` modules inside the model (if any) get quantized matmuls through their processor. The trace's results are part of ``to_dict`` (checkpoints) and come back with
``restore``. Untraced, the adapter falls back to registration order: every quantizable layer, the first and last
of them as ``first`` / ``last``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, Union

from torch import nn

from ..nn.layers import is_quantizable
from .base import ROLE_NAMES, AttentionCall, AttentionInfo, LayerInfo
from .trace import reconstruction_blocks, trace_forward

Selector = Union[str, type, Callable[[str, nn.Module], bool]]
_EMBEDDING_ROLES = {"time_embed", "time_proj", "cond"}


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, str):
        if selector.startswith("re:"):
            return re.fullmatch(selector[3:], name) is not None
        return fnmatch.fnmatchcase(name, selector)
    if isinstance(selector, type):
        return isinstance(module, selector)
    if callable(selector):
        return bool(selector(name, module))
    raise TypeError(f"a role selector must be a name/glob/'re:' string, a module type or a predicate, got {selector!r}")


def select(model: nn.Module, selectors: Iterable[Selector]) -> list[str]:
    """Names of the modules of ``model`` matched by any selector."""
    selectors = list(selectors)
    return [n for n, m in model.named_modules() if n and any(_matches(s, n, m) for s in selectors)]


def roles_example(adapter: Any, roles: Iterable[str]) -> str:
    """How to name layers for ``roles``, as code for the error messages of stages that need them."""
    selectors = ", ".join(f"{role!r}: ['<module name, glob or type>']" for role in roles)
    return f"adapter=GenericAdapter({getattr(adapter, 'timestep_argument', 't')!r}, roles={{{selectors}}})"


class GenericAdapter:
    """Adapter configured by the user.

    Args:
        timestep_argument: name of the ``forward`` argument carrying the diffusion timestep.
        roles: role name -> selectors of the layers (or parents of layers) playing it, e.g.
            ``{"time_embed": ["time_mlp.*"], "time_proj": ["re:.*\\.emb_proj"], "ff": [MyFeedForward]}``.
            Selecting a parent module gives the role to every quantizable layer inside it.
        blocks: selectors of reconstruction units (default: from the trace, see the module docstring).
    """

    name = "generic"

    def __init__(
        self,
        timestep_argument: str,
        roles: Mapping[str, Iterable[Selector]] | None = None,
        blocks: Iterable[Selector] | None = None,
    ) -> None:
        if not isinstance(timestep_argument, str) or not timestep_argument:
            raise ValueError("GenericAdapter needs timestep_argument, the name of the forward argument holding t")
        self.timestep_argument = timestep_argument
        self.roles = {k: list(v) for k, v in (roles or {}).items()}
        unknown = set(self.roles) - set(ROLE_NAMES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; valid roles are {list(ROLE_NAMES)}")
        self.block_selectors = list(blocks) if blocks is not None else None
        self.traced: dict[str, Any] | None = None

    def trace(self, model: nn.Module, example: Mapping[str, Any], sample_argument: str) -> None:
        """Read the layers, ``first`` / ``last`` and blocks from one forward of the full-precision ``model`` on
        ``example`` (the keyword arguments of one calibration row); ``example[sample_argument]`` is the noisy sample."""
        trace = trace_forward(model, example, sample_argument, skip_attention=self.attentions(model))
        names = sorted(trace.layers, key=lambda n: trace.layers[n].first)
        roles = self._selected_roles(model, names)
        candidates = [n for n in names if not roles[n] & _EMBEDDING_ROLES]
        self.traced = {
            "layers": names,
            "first": trace.first_layers(candidates),
            "last": trace.last_layers(candidates),
            "blocks": reconstruction_blocks(model, trace.called),
            "attention": [dataclasses.asdict(call) for call in trace.attention],
        }
        if trace.softmax:
            owners = ", ".join(repr(o) if o else "the model's forward" for o in dict.fromkeys(trace.softmax))
            warnings.warn(
                f"softmax is computed outside scaled_dot_product_attention in {owners}: if that is attention "
                "(softmax(q @ k^T) @ v), its two matmuls stay in full precision. Call "
                "torch.nn.functional.scaled_dot_product_attention(q, k, v) instead to have q, k, v and the "
                "probabilities quantized", stacklevel=3)

    def _selected_roles(self, model: nn.Module, names: Iterable[str]) -> dict[str, set[str]]:
        roles: dict[str, set[str]] = {n: set() for n in names}
        for role, selectors in self.roles.items():
            for parent in select(model, selectors):
                for name in roles:
                    if name == parent or name.startswith(parent + "."):
                        roles[name].add(role)
        return roles

    def layers(self, model: nn.Module) -> dict[str, LayerInfo]:
        traced = self.traced
        names = traced["layers"] if traced is not None else [n for n, m in model.named_modules() if is_quantizable(m)]
        infos = {n: LayerInfo(n, roles) for n, roles in self._selected_roles(model, names).items()}
        if traced is not None:
            first, last = traced["first"], traced["last"]
        else:  # registration order: the first and last layers outside the time/conditioning embeddings
            plain = [n for n, info in infos.items() if not info.roles & _EMBEDDING_ROLES]
            first, last = plain[:1], plain[-1:]
        for role, defaults in (("first", first), ("last", last)):
            if role not in self.roles:
                for name in defaults:
                    infos[name].roles.add(role)
        for info in infos.values():
            if not info.roles:
                info.roles.add("other")
        return infos

    def attentions(self, model: nn.Module) -> dict[str, AttentionInfo]:
        try:
            from diffusers.models.attention_processor import Attention
        except ImportError:  # pragma: no cover - diffusers is a dependency
            return {}
        return {
            n: AttentionInfo(n, bool(getattr(m, "is_cross_attention", False)))
            for n, m in model.named_modules()
            if isinstance(m, Attention)
        }

    def attention_calls(self, model: nn.Module) -> list[AttentionCall]:
        """The traced ``F.scaled_dot_product_attention`` calls (none untraced)."""
        return [AttentionCall(**call) for call in (self.traced or {}).get("attention", [])]

    def blocks(self, model: nn.Module) -> list[str]:
        if self.block_selectors is not None:
            return select(model, self.block_selectors)
        if self.traced is not None:
            return list(self.traced["blocks"])
        return reconstruction_blocks(model)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "timestep_argument": self.timestep_argument, "traced": self.traced}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Take the trace of a checkpoint's adapter (``to_dict``), so a loaded model gets the layers and roles it
        was quantized with; raises if ``saved`` is another adapter's."""
        if saved.get("name") != self.name or saved.get("timestep_argument") != self.timestep_argument:
            raise ValueError(
                f"the checkpoint was made with adapter {dict(saved)!r}, not a GenericAdapter reading "
                f"{self.timestep_argument!r}: pass GenericAdapter(timestep_argument={saved.get('timestep_argument')!r}, ...)"
            )
        self.traced = saved.get("traced")
