"""SmoothQuant smoothing of every prepared layer's input (``ActivationSpec.smoothing``; ``nn/smoothing.py``): one
pass of the full-precision model over the calibration set records each layer's per-channel input range, then each
layer's ``s`` is computed against its weight and folded in. It runs at the start of ``weight_init``, so the weight
quantizers, BRECQ and every later stage calibrate the smoothed weight the deployed kernels multiply.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import QuantLayerMixin
from ..nn.layers import quant_layout
from ..nn.smoothing import smoothing_factors
from ..prepare import handle, quant_layers, quant_state, shared_parameters
from .data import CalibrationSet

logger = logging.getLogger(__name__)


def _input_max(layer: QuantLayerMixin, x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` per input channel ``[C]`` of one layer input."""
    assert layer.smoothing is not None
    dim = layer.smoothing.dim % x.ndim
    return x.detach().abs().float().amax(dim=[d for d in range(x.ndim) if d != dim])


def _weight_max(layer: QuantLayerMixin) -> torch.Tensor:
    """``max |W|`` per input channel ``[C_in]`` over output channels and taps, in the unrotated basis."""
    w = quant_layout(layer, layer.weight).detach().float()  # type: ignore[arg-type]  # [C_out, C_in/groups, *k]
    if layer.rotation is not None:
        w = layer.rotation.to(w.device).unrotate(w, 1)
    groups = getattr(layer, "groups", 1)
    per_column = w.abs().reshape(*w.shape[:2], -1).amax(dim=2)  # [C_out, C_in/groups]
    return per_column.unflatten(0, (groups, -1)).amax(dim=1).flatten()  # group g's columns -> its input channels


@torch.no_grad()
def record_input_ranges(model: nn.Module, calib: CalibrationSet, layers: dict[str, QuantLayerMixin],
                        device: torch.device, batch_size: int, progress: bool = True) -> dict[str, torch.Tensor]:
    """``max |input|`` per channel of each of ``layers`` over every row of ``calib``, full precision."""
    ranges: dict[str, torch.Tensor] = {}

    def hook(name: str, layer: QuantLayerMixin, x: torch.Tensor) -> None:
        seen = _input_max(layer, x)
        ranges[name] = seen if name not in ranges else torch.maximum(ranges[name], seen)

    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: hook(name, m, args[0]))
               for name, layer in layers.items()]
    try:
        with quant_state(model, weight=False, act=False):
            for chunk in tqdm(torch.arange(len(calib)).split(batch_size), desc="smoothing ranges", unit="batch",
                              disable=not progress):
                model(**calib.model_kwargs(chunk, device))
    finally:
        for h in handles:
            h.remove()
    return ranges


def smooth_model(model: nn.Module, calib: CalibrationSet, device: torch.device, batch_size: int = 64,
                 progress: bool = True) -> int:
    """Compute and fold ``s`` into every layer ``prepare`` gave a ``ChannelSmoothing`` (see module docstring); returns
    how many were smoothed. Layers whose weight another module shares (tied weights: the fold would change the
    other user) and layers the pass never reached keep ``s = 1``, named in a warning."""
    alpha = handle(model).config.activation.smoothing
    assert alpha is not None
    candidates = {n: m for n, m in quant_layers(model).items() if m.smoothing is not None}
    shared = shared_parameters(model)
    tied = [n for n, m in candidates.items() if id(m.weight) in shared]
    layers = {n: m for n, m in candidates.items() if n not in tied}
    ranges = record_input_ranges(model, calib, layers, device, batch_size, progress)
    unreached = [n for n in layers if n not in ranges]
    for name, act_max in ranges.items():
        layer = layers[name]
        layer.smooth_inputs(smoothing_factors(act_max, _weight_max(layer), alpha))
    left = tied + unreached
    if left:
        warnings.warn(f"{len(left)} layer(s) keep unsmoothed inputs (s = 1; their activations are quantized as they "
                      f"are): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}. Tied weights cannot be smoothed "
                      "for one user only; a layer the calibration pass never ran has no range", stacklevel=2)
    logger.info("smoothed the inputs of %d layers (alpha %.2f)", len(ranges), alpha)
    return len(ranges)
