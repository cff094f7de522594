"""Adapter for any ``nn.Module`` denoiser that is not from diffusers.

The user names the timestep argument of ``forward`` and, optionally, selectors for roles. A selector is a module
name (exact, or a glob such as ``"blocks.*.time_mlp"``, or a regex written ``"re:<pattern>"``), a module type, or
a predicate ``(name, module) -> bool``. Without selectors: every Linear/Conv/ConvTranspose is quantized with role
``other``, the first and last of them outside the time embeddings (registration order) get ``first`` / ``last``, and diffusers ``Attention``
modules inside the model (if any) get quantized matmuls.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Iterable, Mapping, Union

from torch import nn

from ..nn.layers import is_quantizable
from .base import ROLE_NAMES, AttentionInfo, LayerInfo

Selector = Union[str, type, Callable[[str, nn.Module], bool]]


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


class GenericAdapter:
    """Adapter configured by the user.

    Args:
        timestep_argument: name of the ``forward`` argument carrying the diffusion timestep.
        roles: role name -> selectors of the layers (or parents of layers) playing it, e.g.
            ``{"time_embed": ["time_mlp.*"], "time_proj": ["re:.*\\.emb_proj"], "ff": [MyFeedForward]}``.
            Selecting a parent module gives the role to every quantizable layer inside it.
        blocks: selectors of reconstruction units (default: every direct child holding quantizable layers).
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

    def layers(self, model: nn.Module) -> dict[str, LayerInfo]:
        infos = {n: LayerInfo(n) for n, m in model.named_modules() if is_quantizable(m)}
        for role, selectors in self.roles.items():
            for parent in select(model, selectors):
                for name in infos:
                    if name == parent or name.startswith(parent + "."):
                        infos[name].roles.add(role)
        # default first/last: the first and last layers outside the time/conditioning embeddings
        names = [n for n, info in infos.items() if not info.roles & {"time_embed", "time_proj", "cond"}]
        if names and "first" not in self.roles:
            infos[names[0]].roles.add("first")
        if names and "last" not in self.roles:
            infos[names[-1]].roles.add("last")
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

    def blocks(self, model: nn.Module) -> list[str]:
        if self.block_selectors is not None:
            return select(model, self.block_selectors)
        return [
            n for n, child in model.named_children() if any(is_quantizable(m) for m in child.modules())
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "timestep_argument": self.timestep_argument}
