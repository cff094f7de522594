"""Per-timestep activation initialisation (spec §2.7) and optional running statistics.

For each calibrated timestep, ``act_init_samples`` rows of that timestep run through the model with weights and
activations quantized; a pre-hook on every activation quantizer sets the active row's scale from the input it
sees (min-max or percentile-by-MSE) before the quantizer applies it, so each layer is initialised on inputs that
already carry the upstream layers' quantization, as in the official code. Running statistics then replace the
range by an EMA (momentum 0.95) of per-batch min/max over all rows of that timestep, starting from the true
min/max of the init batch.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fp8 import fp8_scale, search_fp8_minmax, search_fp8_percentile
from ..nn import ActQuantizer
from ..primitives import amin_amax, qparams_from_range, search_minmax, search_percentile
from ..prepare import act_quantizers, handle, quant_state
from .data import CalibrationSet

logger = logging.getLogger(__name__)


def _stats_view(q: ActQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    return x.detach().float(), q.reduce_axis(x)


def _init_from(q: ActQuantizer, x: torch.Tensor, method: str) -> None:
    data, axis = _stats_view(q, x)
    if q.fp8:
        scale = (search_fp8_percentile if method == "percentile" else search_fp8_minmax)(data, axis=axis)
        q.set_row(q.row_index(), scale, torch.zeros_like(scale))
        return
    search = search_percentile if method == "percentile" else search_minmax
    scale, zero_point = search(data, q.bits, q.symmetric, axis=axis, always_zero=q.always_zero)
    q.set_row(q.row_index(), scale, zero_point)


def _from_range(q: ActQuantizer, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q``'s scale and zero point covering ``[lo, hi]`` on its grid."""
    if q.fp8:
        scale = fp8_scale(torch.maximum(lo.abs(), hi.abs()))
        return scale, torch.zeros_like(scale)
    return qparams_from_range(lo, hi, q.bits, q.symmetric, q.always_zero)


@contextlib.contextmanager
def _pre_hooks(model: nn.Module, fn: Callable[[ActQuantizer, torch.Tensor], None]) -> Iterator[None]:
    handles = [q.register_forward_pre_hook(lambda m, args: fn(m, args[0])) for q in act_quantizers(model).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def init_activations(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> None:
    """Initialise every activation quantizer row of a prepared ``model`` from ``calib`` (weights quantized).

    The init batch per row is ``config.act_init_samples`` rows in one forward; ``batch_size`` bounds the batches
    of the running-statistics pass."""
    h = handle(model)
    config = h.config
    device = device or next(model.parameters()).device
    schedule = h.schedule
    groups: dict[int, list[torch.Tensor]] = {}
    for t in calib.timesteps:
        groups.setdefault(schedule.index(t) if len(schedule) > 1 else 0, []).append(torch.nonzero(calib.ts == t).flatten())
    missing = set(range(len(schedule))) - set(groups)
    if missing:
        raise ValueError(
            f"calibration data has no samples for quantizer rows {sorted(missing)} ({schedule.describe()}); "
            "use the calibration set the model was prepared with"
        )
    seen: set[int] = set()

    def init_hook(q: ActQuantizer, x: torch.Tensor) -> None:
        if id(q) not in seen:
            seen.add(id(q))
            _init_from(q, x, config.activation.scale_method)

    bar = tqdm(total=len(groups), desc="activation init", unit="t", disable=not progress)
    with quant_state(model, weight=True, act=True):
        for row, parts in sorted(groups.items()):
            rows = torch.cat(parts)  # one timestep, or all of them for the shared-set ablation (one row)
            generator = torch.Generator().manual_seed(row)
            pick = rows[torch.randperm(len(rows), generator=generator)[: config.act_init_samples]]
            seen.clear()
            with h.state.at_index(row), _pre_hooks(model, init_hook):
                model(**calib.model_kwargs(pick, device))
            if config.running_stat:
                _running_stats(model, calib, rows, row, config.momentum, batch_size, device)
            bar.update(1)
    bar.close()
    logger.info("initialised %d activation quantizers over %d rows", len(act_quantizers(model)), len(groups))


def _running_stats(
    model: nn.Module,
    calib: CalibrationSet,
    rows: torch.Tensor,
    row: int,
    momentum: float,
    batch_size: int,
    device: torch.device | str,
) -> None:
    """EMA of min/max over all ``rows`` (one timestep) for quantizer row ``row``; spec §2.6 running stats."""
    h = handle(model)
    ema: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def stat_hook(q: ActQuantizer, x: torch.Tensor) -> None:
        data, axis = _stats_view(q, x)
        lo, hi = amin_amax(data, axis)
        if id(q) in ema:
            old_lo, old_hi = ema[id(q)]
            lo, hi = momentum * old_lo + (1 - momentum) * lo, momentum * old_hi + (1 - momentum) * hi
        ema[id(q)] = (lo, hi)
        q.set_row(row, *_from_range(q, lo, hi))

    with h.state.at_index(row), _pre_hooks(model, stat_hook):
        for chunk in rows.split(batch_size):
            model(**calib.model_kwargs(chunk, device))
