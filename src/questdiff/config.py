"""Configuration values: what to quantize and how. Frozen dataclasses, validated on construction,
serialisable with ``to_dict``/``from_dict``; presets are values, not code paths.

Defaults follow the official QuEST code (quest-spec §2.3-2.6, §8) except where noted:
- weights: asymmetric, per output channel, Lp (p = 2.4) shrink search over 80 candidates;
- activations: asymmetric, percentile-by-MSE init, per tensor; channel-wise (per input channel) at 4 bits, as the
  official code does (spec §2.6), unless the input channels are smoothed or rotated (``ActivationSpec.smoothing`` /
  ``rotation``, additions that make 4-bit grids deployable; docs/results.md §10 compares them);
- first and last layer activations at 8 bits;
- attention: q and k at 8 bits (symmetric, per tensor, k centred on its token mean), softmax and ``P v`` in floating
  point, the format of the single-pass 8-bit attention kernel (an addition: QuEST quantizes q, k, v and the softmax
  output, ``attention="qkvp"``, whose kernel needs two passes);
- split activation quantization of up-block skip convs on (the official code only does it for SD).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .primitives import check_bits

CONFIG_VERSION = 1


class ConfigError(TypeError, ValueError):
    """A config field of the wrong type or outside its allowed values (both a ``TypeError`` and a ``ValueError``,
    so callers catching either see it)."""


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"a tuple of {_type_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else \
            f"a tuple ({', '.join(_type_name(a) for a in args)})"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (bool is not an int; an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def check_types(config: Any) -> None:
    """Raise ``ConfigError`` naming the field, the expected type and the fix if a field of the dataclass instance
    ``config`` does not match its annotation (e.g. ``channelwise="yes"``, ``act_init_samples=2.5``, a dict where
    a nested config belongs). Called first in every config's ``__post_init__``."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if _matches(value, hint):
            continue
        cls = type(config).__name__
        fix = ""
        if isinstance(value, dict) and dataclasses.is_dataclass(hint):
            fix = f": use {hint.__name__}(**{value!r})"
        raise ConfigError(f"{cls}.{f.name} must be {_type_name(hint)}, got {value!r} ({type(value).__name__}){fix}")

WeightScaleMethod = Literal["lp", "minmax"]
ActScaleMethod = Literal["percentile", "minmax"]
Granularity = Literal["tensor", "channel", "group"]
AttentionFormat = Literal["qk", "qkvp"]
GridFormat = Literal["int", "fp8"]


@dataclass(frozen=True)
class WeightSpec:
    """Weight quantizer settings. ``granularity="channel"`` means per output channel; ``"group"`` splits each
    output channel's flattened input into groups of ``group_size``. ``format="fp8"``: the e4m3 grid (8 bits,
    symmetric: ``symmetric`` is not read; per channel or per tensor; round to nearest, which AdaRound does not
    apply to: BRECQ leaves such layers as they are), instead of integers (``questdiff.fp8``)."""

    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = "channel"
    group_size: int | None = None
    scale_method: WeightScaleMethod = "lp"
    format: GridFormat = "int"

    def __post_init__(self) -> None:
        check_types(self)
        check_bits(self.bits, "weight bit width")
        _check_format(self.format, self.bits, "weight")
        if self.format == "fp8" and self.granularity == "group":
            raise ConfigError("FP8 weights take per-channel or per-tensor scales, not groups: use granularity='channel'")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"unknown weight granularity {self.granularity!r}: use 'tensor', 'channel' or 'group'")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError("weight group_size must be set exactly when granularity='group' (e.g. group_size=64)")
        if self.scale_method not in ("lp", "minmax"):
            raise ValueError(f"unknown weight scale method {self.scale_method!r}: use 'lp' or 'minmax'")


@dataclass(frozen=True)
class ActivationSpec:
    """Activation quantizer settings.

    ``channelwise=None`` means "per input channel iff bits == 4 and neither rotation nor smoothing" (the official
    code's rule, without either).
    ``rotation=b`` rotates the input channels of every quantized layer by a block-diagonal randomized Hadamard
    matrix of block size ``b`` (a power of two; QuaRot / ConvRot style, ``questdiff.nn.rotation``): the layer's
    weight is rotated once at ``prepare`` so the float output is unchanged, while the rotated activation has no
    outlier channels and quantizes well per tensor, a grid the GEMM kernels can apply. It applies to every quantized
    layer whose input channels divide (the 8-bit first/last layers included; the others are named in a warning).
    Attention q/k/v are not rotated: with ``rotation`` set and ``channelwise=None`` they are quantized per tensor
    too, so that the attention kernel runs them.
    ``smoothing=alpha`` divides every quantized layer's input channels by SmoothQuant's static
    ``s = max|x|^alpha / max|W|^(1 - alpha)`` (from the calibration set, at the start of ``weight_init``) and folds
    ``s`` into the weight (``questdiff.nn.smoothing``): outlier channels move into the weight, and 4-bit activations
    become per tensor (with ``channelwise=None``), a grid the kernels run. Applied before the rotation if both are
    set."""

    bits: int = 8
    symmetric: bool = False
    channelwise: bool | None = None
    scale_method: ActScaleMethod = "percentile"
    rotation: int | None = None
    smoothing: float | None = None
    format: GridFormat = "int"

    def __post_init__(self) -> None:
        check_types(self)
        check_bits(self.bits, "activation bit width")
        _check_format(self.format, self.bits, "activation")
        if self.format == "fp8" and self.channelwise:
            raise ConfigError("FP8 activations take one static scale per timestep (per tensor): leave channelwise unset")
        if self.scale_method not in ("percentile", "minmax"):
            raise ValueError(f"unknown activation scale method {self.scale_method!r}: use 'percentile' or 'minmax'")
        if self.rotation is not None and (self.rotation < 2 or self.rotation & (self.rotation - 1)):
            raise ConfigError(f"ActivationSpec.rotation must be a power of two >= 2 (the Hadamard block size, e.g. "
                              f"64), got {self.rotation}; use None for no rotation")
        if self.smoothing is not None and not 0 < self.smoothing <= 1:
            raise ConfigError(f"ActivationSpec.smoothing is SmoothQuant's migration strength alpha, in (0, 1] (e.g. "
                              f"0.5), got {self.smoothing}; use None for no smoothing")

    @property
    def per_channel(self) -> bool:
        if self.channelwise is not None:
            return self.channelwise
        return self.bits == 4 and self.rotation is None and self.smoothing is None


def _check_format(format: str, bits: int, what: str) -> None:
    """FP8 is an 8-bit grid (the allowed format values are checked by ``check_types``)."""
    if format == "fp8" and bits != 8:
        raise ConfigError(f"FP8 {what}s are 8-bit (e4m3), got bits={bits}: use bits=8 or format='int'")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides the structure and initial state of a quantized denoiser.

    Attributes:
        weight / activation: quantizer settings.
        attention: the attention matmuls' format (``nn/attention.py``): ``"qk"`` (default) quantizes q and k on
            symmetric static ``attention_bits`` grids, per tensor, k centred on its token mean, and keeps the softmax
            and ``P v`` in floating point: what the single-pass 8-bit kernel runs. ``"qkvp"`` is QuEST's: q, k, v at
            the activation settings and the softmax output at ``softmax_bits`` (two-pass kernel; simulated when
            4-bit q/k/v are per channel). Checkpoints saved before this field existed are ``"qkvp"``.
        attention_bits: bits of q and k in the ``"qk"`` format (the kernel runs 8).
        softmax_bits: bits of the attention softmax-output quantizer in the ``"qkvp"`` format (always asymmetric with
            zero point 0).
        first_last_act_bits: activation bits forced on the first and last layer (``None`` keeps ``activation.bits``).
        quantize_attention: quantize q, k, v and the softmax output of attention matmuls.
        split_skip: separate activation quantizers for the two concatenated halves feeding up-block skip convs.
        act_init_samples: samples per calibrated timestep used to initialise activation scales (spec: 64).
        running_stat: refine activation ranges with an EMA of min/max over all samples (spec: off at W4A4).
        momentum: EMA momentum of the running statistics.
        timestep_aware: one activation scale set per calibrated timestep (``False``: one shared set; ablation).
    """

    weight: WeightSpec = field(default_factory=WeightSpec)
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    attention: AttentionFormat = "qk"
    attention_bits: int = 8
    softmax_bits: int = 8
    first_last_act_bits: int | None = 8
    quantize_attention: bool = True
    split_skip: bool = True
    act_init_samples: int = 64
    running_stat: bool = False
    momentum: float = 0.95
    timestep_aware: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        check_types(self)
        check_bits(self.softmax_bits, "softmax bit width")
        check_bits(self.attention_bits, "attention q/k bit width")
        if self.attention not in ("qk", "qkvp"):
            raise ConfigError(f"QuantConfig.attention must be 'qk' or 'qkvp', got {self.attention!r}")
        if self.first_last_act_bits is not None:
            check_bits(self.first_last_act_bits, "first/last layer activation bit width")
        if self.act_init_samples < 1:
            raise ValueError("act_init_samples must be >= 1 (the spec uses 64 per timestep)")
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {self.momentum} (the spec uses 0.95)")

    @property
    def label(self) -> str:
        return self.name or f"W{self.weight.bits}A{self.activation.bits}"

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(
                f"quantization config version {version} is not supported by this questdiff (expects "
                f"{CONFIG_VERSION}); re-quantize the model with this version"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown quantization config fields {sorted(unknown)}")
        data.setdefault("attention", "qkvp")  # configs saved before the "qk" format existed ran QuEST's
        data["weight"] = WeightSpec(**data.get("weight", {}))
        data["activation"] = ActivationSpec(**data.get("activation", {}))
        return cls(**data)


def preset(name: str) -> QuantConfig:
    """Config for a preset name ``W<bits>A<bits>`` (case-insensitive), e.g. ``"W4A4"``, or ``W8A8-FP8`` (weights and
    activations on the e4m3 grid, per output channel / per timestep); running statistics follow the official
    README (on, except at 4-bit activations). 4-bit activations are QuEST's per input channel (simulated when deployed);
    ``ActivationSpec(bits=4, smoothing=0.5)`` is the deployable alternative (docs/results.md section 10)."""
    match = re.fullmatch(r"[wW](\d+)[aA](\d+)(-[fF][pP]8)?", name.strip())
    if not match:
        raise ValueError(f"unknown preset {name!r}: use W<bits>A<bits>, e.g. W8A8, W4A8 or W4A4, or W8A8-FP8")
    w_bits, a_bits, fp8 = int(match.group(1)), int(match.group(2)), match.group(3) is not None
    if fp8 and (w_bits, a_bits) != (8, 8):
        raise ValueError(f"unknown preset {name!r}: the FP8 preset is W8A8-FP8 (e4m3 is an 8-bit format)")
    grid = "fp8" if fp8 else "int"
    return QuantConfig(
        weight=WeightSpec(bits=w_bits, format=grid),
        activation=ActivationSpec(bits=a_bits, format=grid),
        running_stat=a_bits > 4,
        name=f"W{w_bits}A{a_bits}" + ("-FP8" if fp8 else ""),
    )


W8A8 = preset("W8A8")
W4A8 = preset("W4A8")
W4A4 = preset("W4A4")
W8A8_FP8 = preset("W8A8-FP8")


def resolve(config: QuantConfig | str) -> QuantConfig:
    """Accept a ``QuantConfig`` or a preset name."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    raise TypeError(f"expected a QuantConfig or a preset name such as 'W8A8', got {type(config).__name__}")
