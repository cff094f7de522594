"""Activation sensitivity (paper §3.3.3, Fig. 3): which layers break when their input is quantized to few bits.

For each quantized layer (or each role group), only that layer's input is fake-quantized to ``bits`` (min-max range
of the batch it sees, per input channel or per tensor), all other activations stay FP (or, with
``others="quantized"``, use the model's calibrated quantizers) and weights stay FP. The score is the MSE of the
denoiser output against the FP model over calibration rows of every timestep (one timestep per batch). The
ranking, highest MSE first, replaces the official code's hard-coded layer lists when
``CMAConfig(critical="sensitivity")``. Layers the config keeps wider than the model's activation bits (the 8-bit
first/last layers of W4A4) are not probed: their low-bit fragility is not what the model suffers.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import ROLE_NAMES
from ..config import ActivationSpec
from ..nn import ActQuantizer, QuantLayerMixin
from ..prepare import handle, quant_layers, quant_state
from ..primitives import fake_quantize, qrange, search_minmax
from .common import generator, output_tensor
from .data import CalibrationSet

logger = logging.getLogger(__name__)


@dataclass
class Sensitivity:
    """Output MSE when ``layers`` (one layer, or every layer of role ``name``) get low-bit inputs."""

    name: str
    mse: float
    layers: list[str] = field(default_factory=list)


def _probe(x: torch.Tensor, bits: int, symmetric: bool, axis: int | None) -> torch.Tensor:
    scale, zero_point = search_minmax(x.detach().float(), bits, symmetric, axis=axis)
    qmin, qmax = qrange(bits, symmetric)
    return fake_quantize(x, scale, zero_point, qmin, qmax)


@contextlib.contextmanager
def low_bit_inputs(model: nn.Module, names: list[str], bits: int, per_channel: bool,
                   layers: dict[str, QuantLayerMixin] | None = None) -> Iterator[None]:
    """Within the block, the layers ``names`` see inputs fake-quantized to ``bits`` (their own activation quantizers
    are bypassed: a pre-hook on each, disabled, probes what it receives, i.e. the input as the layer quantizes it,
    rotated if the layer rotates its input channels). ``layers``: ``quant_layers(model)`` if already at hand."""
    layers = layers if layers is not None else quant_layers(model)
    handles, previous = [], []

    def probe(q: ActQuantizer, args: tuple) -> tuple:
        x = args[0]
        return (_probe(x, bits, q.symmetric, q.channel_dim % x.ndim if per_channel else None),)

    for name in names:
        for q in layers[name].act_quantizers():
            previous.append((q, q.enabled))
            q.enabled = False
            handles.append(q.register_forward_pre_hook(probe))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for q, enabled in previous:
            q.enabled = enabled


def _groups(model: nn.Module, group_by: Literal["layer", "role"], exclude_roles: tuple[str, ...]) -> dict[str, list[str]]:
    """Layer or role groups to probe: not in ``exclude_roles``, and not kept wider than the model's activation bits
    by its config (the first/last layers of W4A4 keep 8-bit inputs: their 4-bit fragility is not what it suffers)."""
    h = handle(model)
    layers, bits = quant_layers(model), h.config.activation.bits
    usable = {n: info for n, info in h.layers.items() if not info.has_role(exclude_roles)
              and all(q.bits <= bits for q in layers[n].act_quantizers())}
    if group_by == "layer":
        return {n: [n] for n in usable}
    if group_by == "role":
        groups = {role: [n for n, info in usable.items() if info.has_role((role,))] for role in ROLE_NAMES}
        return {role: names for role, names in groups.items() if names}
    raise ValueError(f"unknown group_by {group_by!r}: use 'layer' or 'role'")


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    bits: int = 4,
    group_by: Literal["layer", "role"] = "layer",
    per_channel: bool | None = None,
    others: Literal["fp", "quantized"] = "fp",
    samples_per_t: int = 4,
    timesteps: tuple[float, ...] | None = None,
    exclude_roles: tuple[str, ...] = (),
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[Sensitivity]:
    """Rank the layers (or role groups) of a prepared ``model`` by the output MSE their low-bit inputs cause.

    Args:
        bits: probe bit width of the layer inputs.
        group_by: ``"layer"`` (one score per layer) or ``"role"`` (all layers of a role at once).
        per_channel: per-input-channel probe ranges; ``None`` follows the model's activation rule at ``bits``
            (per channel iff ``bits == 4`` by default).
        others: the other activations stay ``"fp"`` or use the model's (initialised) ``"quantized"`` scales.
        samples_per_t: calibration rows per timestep (one batch per timestep); ``timesteps`` restricts those.
        exclude_roles: skip layers playing these roles (e.g. the time-embedding roles trained by TLA).

    Returns: ``Sensitivity`` entries, highest MSE first.
    """
    h = handle(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if per_channel is None:
        spec = h.config.activation
        per_channel = ActivationSpec(bits=bits, channelwise=spec.channelwise, rotation=spec.rotation).per_channel
    g = generator(seed, 31)
    wanted = set(calib.timesteps if timesteps is None else map(float, timesteps))
    batches = []
    for t in calib.timesteps:
        if t in wanted:
            rows = torch.nonzero(calib.ts == t).flatten()
            batches.append(calib.model_kwargs(rows[torch.randperm(len(rows), generator=g)[:samples_per_t]], device))
    if not batches:
        raise ValueError(f"no calibration rows for timesteps {sorted(wanted)} (calibrated: {calib.timesteps})")
    with quant_state(model, weight=False, act=False):
        references = [output_tensor(model(**kwargs)).float() for kwargs in batches]
    groups = _groups(model, group_by, exclude_roles)
    layers = quant_layers(model)
    results = []
    with quant_state(model, weight=False, act=others == "quantized"):
        for name, names in tqdm(groups.items(), desc=f"sensitivity A{bits}", unit=group_by, disable=not progress):
            with low_bit_inputs(model, names, bits, per_channel, layers):
                errors = [F.mse_loss(output_tensor(model(**kw)).float(), ref).item() for kw, ref in zip(batches, references)]
            results.append(Sensitivity(name, sum(errors) / len(errors), names))
    results.sort(key=lambda s: s.mse, reverse=True)
    logger.info("most sensitive at %d bits: %s", bits, ", ".join(f"{s.name} ({s.mse:.3g})" for s in results[:5]))
    return results
