"""Model adapters answer "which layer plays which role" for a model family. Algorithms ask for roles; nothing
outside an adapter matches layer names.

Roles are dotted strings; a selector matches a role and everything below it (``"attn"`` matches
``"attn.self.q"``, ``"attn.cross"`` matches ``"attn.cross.k"``):

=====================  ==============================================================================
``time_embed``         the time-embedding MLP (sinusoid -> embedding)
``time_proj``          per-block projections of the time embedding (UNet ``time_emb_proj``, DiT adaLN modulation)
``attn.self.{q,k,v,out}`` / ``attn.cross.{q,k,v,out}``   attention projections, self vs cross
``attn.joint.{q,k,v,out}`` / ``attn.joint.context.{q,k,v,out}``   joint attention (SD3, FLUX): image / context stream
``ff``                 transformer feed-forward layers
``proj``               transformer ``proj_in`` / ``proj_out``
``skip``               up-block skip (shortcut) convs fed by a concatenation; ``split`` gives the split point
``first`` / ``last``   the denoiser's first and last layer
``cond``               class / added / caption conditioning embeddings - quantized, but never trained by TLA
``other``              everything else (resnet convs, down/up-sampling convs)
=====================  ==============================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, runtime_checkable

from torch import nn

from ..nn.attention import QuantAttnProcessor

ROLE_NAMES = (
    "time_embed",
    "time_proj",
    "attn.self.q",
    "attn.self.k",
    "attn.self.v",
    "attn.self.out",
    "attn.cross.q",
    "attn.cross.k",
    "attn.cross.v",
    "attn.cross.out",
    "attn.joint.q",
    "attn.joint.k",
    "attn.joint.v",
    "attn.joint.out",
    "attn.joint.context.q",
    "attn.joint.context.k",
    "attn.joint.context.v",
    "attn.joint.context.out",
    "ff",
    "proj",
    "skip",
    "first",
    "last",
    "cond",
    "other",
)
TIME_EMBEDDING_ROLES = ("time_embed", "time_proj")


def role_matches(role: str, selector: str) -> bool:
    """``True`` if ``role`` equals ``selector`` or lies below it in the dotted hierarchy."""
    return role == selector or role.startswith(selector + ".")


@dataclass
class LayerInfo:
    """One quantizable layer: its roles and, for skip convs fed by a concatenation, the split channel."""

    name: str
    roles: set[str] = field(default_factory=set)
    split: int = 0

    def has_role(self, selectors: Iterable[str]) -> bool:
        return any(role_matches(r, s) for r in self.roles for s in selectors)


@dataclass
class AttentionInfo:
    """One attention module whose matmuls get quantized: ``cross`` if it attends to conditioning tokens (cross or
    joint attention); ``processor``: the quantized processor class for its attention flavour (constructed as
    ``processor(q_quantizer, k_quantizer, v_quantizer, probs_quantizer, fallback=<current processor>)``)."""

    name: str
    cross: bool
    processor: type[nn.Module] = QuantAttnProcessor


@dataclass
class AttentionCall:
    """One ``F.scaled_dot_product_attention`` call of a traced forward: the innermost module that made it (``""``:
    the model's own forward) and the last dims of its query, key and value."""

    owner: str
    q_dim: int
    k_dim: int
    v_dim: int


@runtime_checkable
class ModelAdapter(Protocol):
    """What the quantizer needs to know about a denoiser family."""

    name: str
    timestep_argument: str

    def layers(self, model: nn.Module) -> dict[str, LayerInfo]:
        """Every layer to quantize (``questdiff.nn.is_quantizable``: Linear/Conv/ConvTranspose) by qualified name,
        with roles."""
        ...

    def attentions(self, model: nn.Module) -> dict[str, AttentionInfo]:
        """Attention modules whose q/k/v/softmax get quantized."""
        ...

    def blocks(self, model: nn.Module) -> list[str]:
        """Reconstruction units (resnets, transformer/attention blocks) in forward order."""
        ...

    def to_dict(self) -> dict:
        """Serializable description (for checkpoints)."""
        ...

    # Optional (looked up with getattr):
    # - ``trace(model, example_kwargs, sample_argument)``: read layers/roles from one forward; ``quantize`` calls it
    #   on a calibration row before ``prepare``.
    # - ``restore(saved)``: take back what ``to_dict`` saved; ``load`` calls it before ``prepare``.
    # - ``attention_calls(model) -> list[AttentionCall]``: ``F.scaled_dot_product_attention`` calls, in call order
    #   within each owner module, whose q/k/v/softmax get quantized (``questdiff.nn.sdpa``).


_REGISTRY: list[tuple[type[nn.Module], Callable[[], ModelAdapter]]] = []


def register_adapter(model_class: type[nn.Module]) -> Callable[[Callable[[], ModelAdapter]], Callable[[], ModelAdapter]]:
    """Decorator registering an adapter factory for ``model_class`` (and its subclasses)."""

    def decorate(factory: Callable[[], ModelAdapter]) -> Callable[[], ModelAdapter]:
        _REGISTRY.insert(0, (model_class, factory))
        return factory

    return decorate


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The registered adapter for ``model``'s class; raises with the fix if none is registered."""
    for model_class, factory in _REGISTRY:
        if isinstance(model, model_class):
            return factory()
    known = sorted({cls.__name__ for cls, _ in _REGISTRY})
    raise ValueError(
        f"no adapter is registered for {type(model).__name__} (known: {known}); pass "
        "adapter=questdiff.GenericAdapter(timestep_argument='<name of the timestep argument>') to quantize it"
    )
