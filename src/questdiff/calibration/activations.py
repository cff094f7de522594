"""Per-timestep activation initialisation (spec §2.7) and optional running statistics.

For each calibrated timestep, ``act_init_samples`` rows of that timestep run through the model with weights and
activations quantized; a pre-hook on every activation quantizer sets the active row's scale from the input it
sees (min-max or percentile-by-MSE) before the quantizer applies it, so each layer is initialised on inputs that
already carry the upstream layers' quantization, as in the official code. Running statistics then replace the
range by an EMA (momentum 0.95) of per-batch min/max over all rows of that timestep, starting from the true
min/max of the init batch.

Rows also cover the sampler steps between the calibrated ones: each recorded step that has no row of its own
(``CalibrationSet.range_steps``) runs the same init (and running statistics) on the row its timestep maps to, and the
row keeps the union of the ranges (``RowRanges``). Without it a row's static range, calibrated at one step, clips the
larger activations of the cleaner steps that share the row (measured in docs/results.md §7).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fp8 import FP8_MAX, fp8_scale, search_fp8_minmax, search_fp8_percentile
from ..nn import ActQuantizer
from ..primitives import amin_amax, qparams_from_range, search_minmax, search_percentile
from ..prepare import act_quantizers, handle, quant_state
from ..timestep import TimestepError, TimestepSchedule
from .data import CalibrationSet

logger = logging.getLogger(__name__)


def _stats_view(q: ActQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    return x.detach().float(), q.reduce_axis(x)


def covered_range(q: ActQuantizer, scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real range ``[lo, hi]`` that ``_from_range`` turns into ``(scale, zero_point)`` for ``q``'s grid."""
    if q.fp8:
        hi = scale * FP8_MAX
        return -hi, hi
    if q.symmetric or q.always_zero:
        hi = scale * q.qmax
        return (torch.zeros_like(hi) if q.always_zero else -hi), hi
    return -zero_point * scale, (q.qmax - q.qmin - zero_point) * scale


class RowRanges:
    """Activation ranges of one quantizer row accumulated over several *units* of calibration rows: the calibrated
    step's, then each range step mapped to the row (``CalibrationSet.range_steps``). Within a unit the row is set as
    before (init, then running statistics); across units it holds the union of the units' ranges, so the row covers
    every sampler step that uses it. With one unit the row is exactly what that unit sets."""

    def __init__(self, row: int) -> None:
        self.row = row
        self._done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # union of finished units: (scale, zero_point)
        self._current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set(self, q: ActQuantizer, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set ``q``'s row from the current unit's ``(scale, zero_point)``, widened by the finished units."""
        scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
        done = self._done.get(id(q))
        if done is not None:
            (lo0, hi0), (lo1, hi1) = covered_range(q, *done), covered_range(q, scale, zero_point)
            lo, hi = torch.minimum(lo0, lo1), torch.maximum(hi0, hi1)
            wide_scale, wide_zero = _from_range(q, lo, hi)
            inside = (lo == lo0) & (hi == hi0)  # keep the finished units' exact qparams where nothing widens
            scale, zero_point = torch.where(inside, done[0], wide_scale), torch.where(inside, done[1], wide_zero)
        self._current[id(q)] = (scale, zero_point)
        q.set_row(self.row, scale, zero_point)

    def finish_unit(self) -> None:
        self._done.update(self._current)
        self._current = {}


def _init_from(q: ActQuantizer, x: torch.Tensor, method: str, ranges: RowRanges) -> None:
    data, axis = _stats_view(q, x)
    if q.fp8:
        scale = (search_fp8_percentile if method == "percentile" else search_fp8_minmax)(data, axis=axis)
        ranges.set(q, scale, torch.zeros_like(scale))
        return
    search = search_percentile if method == "percentile" else search_minmax
    ranges.set(q, *search(data, q.bits, q.symmetric, axis=axis, always_zero=q.always_zero))


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


Unit = tuple[CalibrationSet, torch.Tensor]  # rows of one set whose statistics are taken together


def row_units(calib: CalibrationSet, schedule: TimestepSchedule) -> dict[int, list[Unit]]:
    """Quantizer row -> its units: first the calibrated rows of its timestep (all calibrated rows for a one-row
    schedule), then one unit per range step whose timestep maps to the row (steps that map nowhere are left out:
    sampling raises there anyway). A range step that is a key of ``schedule`` (``quantize(range_steps="rows")``)
    is its row's only unit."""
    single = len(schedule) == 1
    calibrated: dict[int, list[torch.Tensor]] = {}
    for t in calib.timesteps:
        calibrated.setdefault(0 if single else schedule.index(t), []).append(torch.nonzero(calib.ts == t).flatten())
    units: dict[int, list[Unit]] = {row: [(calib, torch.cat(parts))] for row, parts in calibrated.items()}
    extra = calib.range_steps
    if extra is not None:
        for t in extra.timesteps:
            try:
                row = 0 if single else schedule.index(t)
            except TimestepError:
                continue
            units.setdefault(row, []).append((extra, torch.nonzero(extra.ts == t).flatten()))
    return units


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

    The init batch per unit (``row_units``) is ``config.act_init_samples`` rows in one forward; ``batch_size``
    bounds the batches of the running-statistics pass. A row with range steps gets the union of its units' ranges."""
    h = handle(model)
    config = h.config
    device = device or next(model.parameters()).device
    schedule = h.schedule
    units = row_units(calib, schedule)
    missing = set(range(len(schedule))) - set(units)
    if missing:
        raise ValueError(
            f"calibration data has no samples for quantizer rows {sorted(missing)} ({schedule.describe()}); "
            "use the calibration set the model was prepared with"
        )
    seen: set[int] = set()

    def init_hook(q: ActQuantizer, x: torch.Tensor, ranges: RowRanges) -> None:
        if id(q) not in seen:
            seen.add(id(q))
            _init_from(q, x, config.activation.scale_method, ranges)

    bar = tqdm(total=sum(map(len, units.values())), desc="activation init", unit="step", disable=not progress)
    with quant_state(model, weight=True, act=True):
        for row, row_sets in sorted(units.items()):
            ranges = RowRanges(row)
            for data, rows in row_sets:
                generator = torch.Generator().manual_seed(row)
                pick = rows[torch.randperm(len(rows), generator=generator)[: config.act_init_samples]]
                seen.clear()
                with h.state.at_index(row), _pre_hooks(model, lambda q, x: init_hook(q, x, ranges)):
                    model(**data.model_kwargs(pick, device))
                if config.running_stat:
                    _running_stats(model, data, rows, ranges, config.momentum, batch_size, device)
                ranges.finish_unit()
                bar.update(1)
    bar.close()
    logger.info("initialised %d activation quantizers over %d rows (%d units: calibrated and range steps)",
                len(act_quantizers(model)), len(units), sum(map(len, units.values())))


def _running_stats(
    model: nn.Module,
    calib: CalibrationSet,
    rows: torch.Tensor,
    ranges: RowRanges,
    momentum: float,
    batch_size: int,
    device: torch.device | str,
) -> None:
    """EMA of min/max over ``rows`` (one unit) for quantizer row ``ranges.row``; spec §2.6 running stats."""
    h = handle(model)
    ema: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def stat_hook(q: ActQuantizer, x: torch.Tensor) -> None:
        data, axis = _stats_view(q, x)
        lo, hi = amin_amax(data, axis)
        if id(q) in ema:
            old_lo, old_hi = ema[id(q)]
            lo, hi = momentum * old_lo + (1 - momentum) * lo, momentum * old_hi + (1 - momentum) * hi
        ema[id(q)] = (lo, hi)
        ranges.set(q, *_from_range(q, lo, hi))

    with h.state.at_index(ranges.row), _pre_hooks(model, stat_hook):
        for chunk in rows.split(batch_size):
            model(**calib.model_kwargs(chunk, device))
