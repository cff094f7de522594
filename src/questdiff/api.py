"""Public entry point ``quantize``: prepare -> the method's calibration stages -> a fake-quantized denoiser."""
from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from . import distributed
from .adapters import ModelAdapter, get_adapter
from .calibration.data import CalibrationSet
from .calibration.methods import StageContext, check_options, method_stages, preflight, run_stages
from .config import QuantConfig, resolve
from .prepare import handle, prepare, require_full_precision
from .timestep import Rule, TimestepSchedule, timestep_getter

RangeSteps = Literal["widen", "rows"]
RANGE_STEPS = ("widen", "rows")

logger = logging.getLogger(__name__)


def _unchanged_on_failure(quantize: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Wrap ``quantize`` so that if it fails (or is interrupted) the denoiser is put back as it was: its module
    tree, hooks, attention processors and attributes (every module's own dicts, shallow-copied) and its tensor
    values (a CPU copy: finetuning trains the shared weights in place). A failed call thus leaves the FP model, not
    a half-wrapped one that a retry would call "already quantized"."""

    @functools.wraps(quantize)
    def run(denoiser: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        saved = [(m, {k: v.copy() if type(v) in (dict, OrderedDict) else v for k, v in vars(m).items()})
                 for m in denoiser.modules()]
        values = {k: v.detach().to("cpu", copy=True) for k, v in denoiser.state_dict().items()
                  if isinstance(v, torch.Tensor)}
        try:
            return quantize(denoiser, *args, **kwargs)
        except BaseException:
            for module, attributes in saved:
                vars(module).clear()
                vars(module).update(attributes)
            with torch.no_grad():
                current = denoiser.state_dict()
                for key, value in values.items():
                    current[key].copy_(value)
            raise

    return run


@_unchanged_on_failure
def quantize(
    denoiser: nn.Module,
    preset: QuantConfig | str,
    calib: CalibrationSet,
    method: str = "rtn",
    *,
    adapter: ModelAdapter | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    work_dir: str | Path | None = None,
    timestep_rule: Rule = "at_or_before",
    range_steps: RangeSteps = "widen",
    progress: bool = True,
    seed: int = 0,
    **method_options: Any,
) -> nn.Module:
    """Quantize ``denoiser`` in place and return it; if it fails (or is interrupted), ``denoiser`` is left as it was.

    Args:
        denoiser: the FP denoiser (e.g. ``pipe.unet``); it is modified in place and stays usable in its pipeline.
        preset: a ``QuantConfig`` or a preset name (``"W8A8"``, ``"W4A8"``, ``"W4A4"``, any ``"W<b>A<b>"``).
        calib: calibration data from ``collect_calibration`` / ``record_calibration``; its distinct timesteps
            become the per-timestep quantizer rows.
        method: ``"rtn"`` (Lp-searched weights, round to nearest, per-timestep activation init) or a registered
            calibration method (see ``questdiff.calibration.methods.available_methods()``).
        adapter: role adapter; defaults to the one registered for the model class (diffusers UNets). Non-diffusers
            models need ``GenericAdapter(timestep_argument=...)``, which reads the layers, first/last roles, blocks
            and ``F.scaled_dot_product_attention`` calls from one forward on a calibration row.
        device: where calibration runs (default: the model's device).
        work_dir: if given, each finished stage is saved there and a restarted call resumes from it.
        timestep_rule: how sampler timesteps map to calibrated rows (``"at_or_before"`` or ``"nearest"``).
        range_steps: what the recorded steps that were not selected as calibrated timesteps
            (``calib.range_steps``) do: ``"widen"`` the activation ranges of the calibrated row they map to (the
            default: every recorded step then quantizes within its row's range), or get ``"rows"`` of their own,
            initialised from their statistics and left out of finetuning (docs/results.md §7 compares them).
        method_options: per-method settings (e.g. ``tla=TLAConfig(...)``); an option no stage of ``method`` reads,
            or a malformed one, raises before any work.

    Every stage's preconditions (options, the roles TLA/CMA train) are checked before the model is touched.
    In a process group (``torchrun``) every rank calls it with the same arguments: BRECQ/TLA/CMA split each batch
    over the ranks, rank 0 writes the stage files and shows progress, and every rank ends with rank 0's model.
    """
    if isinstance(preset, CalibrationSet):
        raise TypeError("quantize(denoiser, preset, calib): pass the preset (e.g. 'W8A8') before the calibration set")
    config = resolve(preset)
    if not isinstance(calib, CalibrationSet):
        raise ValueError(
            f"quantize needs calibration data, got {type(calib).__name__}: calib = questdiff.collect_calibration(pipe) "
            "(or record_calibration)"
        )
    require_full_precision(denoiser)
    method_stages(method)  # fail fast on an unknown method
    check_options(method, method_options)
    adapter = adapter or get_adapter(denoiser)
    timestep_getter(denoiser.forward, adapter.timestep_argument)  # the named argument must exist
    calib.validate(denoiser)
    if calib.timestep_key != adapter.timestep_argument:
        raise ValueError(
            f"calibration data recorded the timestep as {calib.timestep_key!r} but the adapter reads "
            f"{adapter.timestep_argument!r}; record with the same timestep argument"
        )
    first = next(denoiser.parameters(), None)
    device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    denoiser.to(device).eval()
    trace = getattr(adapter, "trace", None)
    if trace is not None:  # adapters that read layers and roles from one forward (GenericAdapter)
        trace(denoiser, calib.model_kwargs(torch.nonzero(calib.ts == calib.timesteps[0]).flatten()[:1], device),
              calib.sample_key)
    if range_steps not in RANGE_STEPS:
        raise ValueError(f"unknown range_steps {range_steps!r}: use one of {RANGE_STEPS}")
    keys = calib.recorded_timesteps if range_steps == "rows" else calib.timesteps
    schedule = TimestepSchedule.from_timesteps(keys, timestep_rule, calib.recorded_timesteps)
    ctx = StageContext(device=device, batch_size=batch_size, progress=progress and distributed.is_main(), seed=seed,
                       options=method_options, method=method)
    preflight(denoiser, adapter, calib, method, ctx)
    prepare(denoiser, config, schedule, adapter)
    run_stages(denoiser, calib, method, ctx, work_dir)
    handle(denoiser).extra["report"] = ctx.report
    logger.info("quantized %s to %s with %s", type(denoiser).__name__, config.label, method)
    return denoiser
