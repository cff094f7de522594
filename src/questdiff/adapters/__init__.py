"""Model adapters: which layers play which role, per model family (one file per family)."""
from . import diffusers_transformer, diffusers_unet  # noqa: F401  (register the diffusers adapters)
from .base import (
    ROLE_NAMES,
    TIME_EMBEDDING_ROLES,
    AttentionCall,
    AttentionInfo,
    LayerInfo,
    ModelAdapter,
    get_adapter,
    register_adapter,
    role_matches,
)
from .diffusers_transformer import DiffusersTransformerAdapter
from .diffusers_unet import DiffusersUNetAdapter
from .generic import GenericAdapter, roles_example

__all__ = [
    "ROLE_NAMES",
    "TIME_EMBEDDING_ROLES",
    "AttentionCall",
    "AttentionInfo",
    "DiffusersTransformerAdapter",
    "DiffusersUNetAdapter",
    "GenericAdapter",
    "LayerInfo",
    "ModelAdapter",
    "get_adapter",
    "register_adapter",
    "role_matches",
    "roles_example",
]
