"""Turn a denoiser into its fake-quantized twin, in place: wrap every quantizable layer, install the attention
processors and the timestep hook, and attach a ``QuantHandle`` that owns the config, schedule and state.

Structure only: quantizer parameters keep their neutral initial values until calibration fills them. The one change
to the model's own weights: with ``ActivationSpec.rotation`` each rotated layer's weight is multiplied by its
input-channel rotation in place (its float output is unchanged, since the layer rotates its input the same way).
With ``ActivationSpec.smoothing`` each layer gets a ``ChannelSmoothing`` of ones here; ``weight_init`` fills it from
the calibration data and folds it into the weight (``calibration/smoothing.py``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .adapters import LayerInfo, ModelAdapter, get_adapter
from .config import ActivationSpec, QuantConfig
from .digest import stats_digest
from .nn import ActQuantizer, QuantLayerMixin, WeightQuantizer, wrap_layer
from .nn.layers import is_quantizable, quant_layout
from .nn.rotation import ChannelRotation
from .nn.smoothing import ChannelSmoothing
from .nn.sdpa import AttentionSite, install_sdpa_quantizers
from .timestep import TimestepSchedule, TimestepState, install_timestep_hook

HANDLE_ATTR = "_questdiff"
DEPLOYED_KEY = "deployed"  # the ``QuantHandle.extra`` entry of a model that ``convert`` turned into deployed modules


@dataclass
class QuantHandle:
    """Quantization bookkeeping attached to a prepared denoiser (``model._questdiff``)."""

    config: QuantConfig
    schedule: TimestepSchedule
    state: TimestepState
    adapter: ModelAdapter
    layers: dict[str, LayerInfo]
    fingerprint: str
    hook: Any
    method: str = "none"
    stages: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def at_timestep(self, t: torch.Tensor | float | int) -> contextlib.AbstractContextManager[int | None]:
        return self.state.at_timestep(t)


def handle(model: nn.Module) -> QuantHandle:
    """The ``QuantHandle`` of a prepared/quantized denoiser; raises if ``model`` is not quantized."""
    h = getattr(model, HANDLE_ATTR, None)
    if h is None:
        raise ValueError(f"{type(model).__name__} is not quantized: run questdiff.quantize(model, ...) first")
    return h


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, HANDLE_ATTR, None) is not None


def require_full_precision(model: nn.Module) -> None:
    """Raise if ``model`` is already quantized (it must be prepared from the full-precision model)."""
    if is_quantized(model):
        raise ValueError("the model is already quantized: start from a fresh copy of the full-precision model")


def fingerprint(model: nn.Module) -> str:
    """Hash of the base model's class, config and parameter names/shapes (quantizer state excluded)."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        if "_quantizer." not in name:
            h.update(f"{name}:{tuple(p.shape)}".encode())
    return h.hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """Hash of the base model's parameter values (sum and sum of squares of each; quantizer state excluded): unlike
    ``fingerprint``, tells apart two trainings of one architecture."""
    named = [(n, p) for n, p in model.named_parameters() if "_quantizer." not in n]
    return stats_digest("|".join(n for n, _ in named), [p for _, p in named])


def _act_spec(config: QuantConfig, info: LayerInfo) -> ActivationSpec:
    if config.first_last_act_bits is not None and info.roles & {"first", "last"}:
        return ActivationSpec(
            bits=config.first_last_act_bits,
            symmetric=config.activation.symmetric,
            channelwise=config.activation.per_channel,
            scale_method=config.activation.scale_method,
            rotation=config.activation.rotation,  # rotated too: their 8-bit per-tensor grid gains as well
            smoothing=config.activation.smoothing,  # smoothed too, for the same reason
            format=config.activation.format if config.first_last_act_bits == 8 else "int",  # e4m3 is 8-bit only
        )
    return config.activation


def _rotate(layer: QuantLayerMixin, spec: ActivationSpec, shared: set[int]) -> str | None:
    """Rotate ``layer``'s input channels as ``spec.rotation`` asks; returns why it could not (``None``: done or not
    asked). ``shared``: ids of weights used by more than one module (rotating one user would break the others)."""
    block = spec.rotation
    if block is None:
        return None
    linear = isinstance(layer, nn.Linear)
    channels = layer.in_features if linear else layer.in_channels  # type: ignore[union-attr]
    if getattr(layer, "groups", 1) != 1:
        return f"groups={layer.groups}"  # type: ignore[attr-defined]
    if channels % block or layer.split % block:
        return f"{channels} input channels" + (f", split at {layer.split}" if layer.split else "")
    if id(layer.weight) in shared:
        return "weight shared with another module"
    layer.rotate_inputs(ChannelRotation(channels, block, -1 if linear else 1))
    return None


def _attach_smoothing(layer: QuantLayerMixin) -> None:
    """Give ``layer`` its neutral ``ChannelSmoothing`` (``s = 1``); ``calibration/smoothing.py`` sets it."""
    linear = isinstance(layer, nn.Linear)
    channels = layer.in_features if linear else layer.in_channels  # type: ignore[union-attr]
    layer.smoothing = ChannelSmoothing(channels, -1 if linear else 1).to(layer.weight.device)


def _wrap(module: nn.Module, info: LayerInfo, config: QuantConfig, rows: int, state: TimestepState) -> QuantLayerMixin:
    spec = _act_spec(config, info)
    channel_dim = -1 if isinstance(module, nn.Linear) else 1
    channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    split = info.split if config.split_skip else 0
    weight = quant_layout(module, module.weight)
    if not split:
        return wrap_layer(
            module,
            WeightQuantizer(weight.shape, config.weight),
            ActQuantizer(rows, spec, state, channels, channel_dim),
        )
    head, tail = weight[:, :split].shape, weight[:, split:].shape
    return wrap_layer(
        module,
        WeightQuantizer(head, config.weight),
        ActQuantizer(rows, spec, state, split, channel_dim),
        split,
        WeightQuantizer(tail, config.weight),
        ActQuantizer(rows, spec, state, channels - split, channel_dim),
    )


def _attention_quantizers(config: QuantConfig, rows: int, state: TimestepState, q_dim: int, k_dim: int,
                          v_dim: int) -> tuple[ActQuantizer, ActQuantizer, ActQuantizer | None, ActQuantizer | None]:
    """q, k, v and softmax-probability quantizers in ``config.attention``'s format: "qk": q and k per tensor,
    symmetric, ``attention_bits`` (v and probabilities unquantized: ``None``); "qkvp": q, k, v per head_dim channel
    at the activation settings and a per-tensor zero-point-0 quantizer for the softmax output."""
    if config.attention == "qk":
        spec = ActivationSpec(bits=config.attention_bits, symmetric=True, channelwise=False,
                              scale_method=config.activation.scale_method)
        return ActQuantizer(rows, spec, state), ActQuantizer(rows, spec, state), None, None
    probs = ActivationSpec(bits=config.softmax_bits, symmetric=False, channelwise=False)
    return (
        ActQuantizer(rows, config.activation, state, q_dim, -1),
        ActQuantizer(rows, config.activation, state, k_dim, -1),
        ActQuantizer(rows, config.activation, state, v_dim, -1),
        ActQuantizer(rows, probs, state, always_zero=True),
    )


def _attention_processor(attn: nn.Module, processor: type[nn.Module], config: QuantConfig, rows: int,
                         state: TimestepState) -> nn.Module:
    """The adapter's quantized ``processor`` class for ``attn`` with its operand quantizers (``_attention_quantizers``)."""
    q_dim = attn.to_q.out_features // attn.heads
    kv_dim = attn.to_k.out_features // attn.heads
    return processor(*_attention_quantizers(config, rows, state, q_dim, kv_dim, kv_dim), fallback=attn.processor)


def prepare(
    model: nn.Module,
    config: QuantConfig,
    schedule: TimestepSchedule,
    adapter: ModelAdapter | None = None,
) -> nn.Module:
    """Wrap ``model`` in place for fake quantization and return it.

    Raises ``ValueError`` if ``model`` is already quantized or has no quantizable layer.
    """
    require_full_precision(model)
    adapter = adapter or get_adapter(model)
    base_fingerprint = fingerprint(model)
    layers = adapter.layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear/Conv1d/Conv2d layer (nor Conv3d/ConvTranspose) to quantize; check that you passed the "
            "denoiser (e.g. pipe.unet), not the pipeline"
        )
    if not config.timestep_aware:
        schedule = TimestepSchedule(schedule.timesteps[:1], schedule.rule, schedule.recorded)
    state = TimestepState(schedule)
    rows = len(schedule)
    hook = install_timestep_hook(model, adapter.timestep_argument, HANDLE_ATTR)
    shared = shared_parameters(model)
    unrotated = []
    for name, info in layers.items():
        layer = model.get_submodule(name)
        # new quantizer parameters follow the layer's device and dtype
        wrapped = _wrap(layer, info, config, rows, state).to(layer.weight.device)
        model.set_submodule(name, wrapped)
        if config.activation.smoothing is not None:
            _attach_smoothing(wrapped)
        reason = _rotate(wrapped, _act_spec(config, info), shared)
        if reason:
            unrotated.append(f"{name} ({reason})")
    if config.quantize_attention:
        attentions = adapter.attentions(model)
        for name, info in attentions.items():
            attn = model.get_submodule(name)
            attn.set_processor(_attention_processor(attn, info.processor, config, rows, state).to(attn.to_q.weight.device))
        find_calls = getattr(adapter, "attention_calls", None)  # F.scaled_dot_product_attention calls (GenericAdapter)
        calls = find_calls(model) if find_calls is not None else []
        if calls:
            sites = [AttentionSite(*_attention_quantizers(config, rows, state, c.q_dim, c.k_dim, c.v_dim)) for c in calls]
            install_sdpa_quantizers(model, [c.owner for c in calls], sites, attentions).to(_device(model))
    setattr(model, HANDLE_ATTR, QuantHandle(config, schedule, state, adapter, layers, base_fingerprint, hook))
    _warn_full_precision(model)
    _warn_unrotated(unrotated, config.activation.rotation)
    return model


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


def _listed(names: list[str], shown: int) -> str:
    """The first ``shown`` names, and how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _warn_unrotated(names: list[str], block: int | None, shown: int = 12) -> None:
    if names:
        warnings.warn(
            f"{len(names)} quantized layer(s) keep unrotated inputs, so their activations are quantized without "
            f"rotation (per tensor unless channelwise=True): {_listed(names, shown)}. Rotation in blocks of "
            f"{block} needs ungrouped layers whose input channels (each half of a split skip conv) are a multiple of "
            f"{block}: a smaller power-of-two rotation block fits more layers",
            stacklevel=3,
        )


def full_precision_layers(model: nn.Module) -> list[str]:
    """Modules of a prepared ``model`` that compute with a weight matrix (a parameter named like ``weight`` with 2+
    dims) but were not wrapped: custom or unsupported layers, subclasses with a forward of their own, layers the
    adapter left out. Embedding tables (lookups, kept FP everywhere) and norms (1-D weights) are not listed."""
    return [
        f"{name or type(model).__name__} ({type(m).__name__}{', not selected by the adapter' if is_quantizable(m) else ''})"
        for name, m in model.named_modules()
        if not isinstance(m, (QuantLayerMixin, nn.Embedding, nn.EmbeddingBag))
        and any("weight" in pname and p.ndim >= 2 for pname, p in m.named_parameters(recurse=False))
    ]


def _warn_full_precision(model: nn.Module, shown: int = 12) -> None:
    names = full_precision_layers(model)
    if names:
        warnings.warn(
            f"{len(names)} layer(s) with weights stay in full precision: {_listed(names, shown)}. questdiff "
            "quantizes Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d layers (and subclasses without a forward of "
            "their own) that its adapter selects; the generic adapter selects those its traced forward calls",
            stacklevel=3,
        )


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def quant_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    """Every fake-quant layer by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    """Every activation quantizer by qualified name (layer inputs and attention operands)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


def weight_quantizers(model: nn.Module) -> dict[str, WeightQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, WeightQuantizer)}


def set_quant_state(model: nn.Module, weight: bool = True, act: bool = True) -> None:
    """Switch weight and activation quantization of every layer (both off = the FP model)."""
    for q in weight_quantizers(model).values():
        q.enabled = weight
    for q in act_quantizers(model).values():
        q.enabled = act


@contextlib.contextmanager
def quant_state(model: nn.Module, weight: bool, act: bool) -> Iterator[None]:
    """Temporarily switch quantization; restores each quantizer's previous state."""
    previous = [(q, q.enabled) for q in [*weight_quantizers(model).values(), *act_quantizers(model).values()]]
    set_quant_state(model, weight, act)
    try:
        yield
    finally:
        for q, enabled in previous:
            q.enabled = enabled


def at_timestep(model: nn.Module, t: torch.Tensor | float | int) -> contextlib.AbstractContextManager[int | None]:
    """``with questdiff.at_timestep(model, t):`` activates the quantizer row of ``t`` (tests, calibration loops)."""
    return handle(model).at_timestep(t)
