"""The Q-Diffusion baseline and QuEST as resumable stage lists, and their options.

Methods (``questdiff.quantize(..., method=...)``):

============  =============================================================================================
``qdiffusion``  weight init (Lp) -> BRECQ/AdaRound -> per-timestep activation init (baseline)
``quest``       weight init -> BRECQ/AdaRound -> activation init -> TLA -> CMA (+ global loss)
``quest-tla``   ... -> activation init -> TLA           (ablation: no CMA)
``quest-cma``   ... -> activation init -> CMA           (ablation: no TLA)
============  =============================================================================================

Options (keyword arguments of ``quantize``): ``brecq=BrecqConfig(...)``, ``tla=TLAConfig(...)``,
``cma=CMAConfig(...)`` (a config or a dict of its fields) and ``global_loss=False`` (drops the global output loss
in TLA and CMA, Table 7's ablation). Each stage records its losses in ``handle(model).extra["calibration"]``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..adapters import TIME_EMBEDDING_ROLES
from ..config import ConfigError
from ..prepare import handle
from .brecq import BrecqConfig, estimate_reconstruction, rebuild_adaround, reconstruct
from .cma import CMAConfig, cma_plan, critical_roles, detect_family, run_cma
from .common import layers_with_roles
from .data import CalibrationSet
from .finetune import keep_teacher_copies, plan_seconds, release_teacher_copies
from .methods import (
    ACT_INIT,
    WEIGHT_INIT,
    Preflight,
    Stage,
    StageContext,
    check_options,
    method_options,
    method_stages,
    register_method,
)
from .tla import TLAConfig, check_tla_roles, run_tla, tla_plan

logger = logging.getLogger(__name__)

__all__ = ["METHOD_OPTIONS", "QuestOptions", "later_stages_pending", "resolve_options"]

_CONFIGS = {"brecq": BrecqConfig, "tla": TLAConfig, "cma": CMAConfig}


@dataclass(frozen=True)
class QuestOptions:
    """Resolved per-stage configs of one ``quantize`` call."""

    brecq: BrecqConfig = field(default_factory=BrecqConfig)
    tla: TLAConfig = field(default_factory=TLAConfig)
    cma: CMAConfig = field(default_factory=CMAConfig)


def resolve_options(options: Mapping[str, Any], method: str = "quest") -> QuestOptions:
    """Configs from ``quantize``'s method options; raises ``ValueError`` naming unknown or malformed options."""
    check_options(method, options)
    configs: dict[str, Any] = {}
    for key, cls in _CONFIGS.items():
        value = options.get(key)
        if value is None:
            configs[key] = cls()
        elif isinstance(value, cls):
            configs[key] = value
        elif isinstance(value, Mapping):
            try:
                configs[key] = cls(**value)
            except ConfigError as err:
                raise ValueError(f"bad {key} option: {err}") from err
            except TypeError as err:  # an unknown field
                names = [f.name for f in dataclasses.fields(cls)]
                raise ValueError(f"bad {key} options {dict(value)} ({err}); {cls.__name__} fields are {names}") from err
        else:
            raise ValueError(f"option {key} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    if "global_loss" in options:
        flag = options["global_loss"]
        if not isinstance(flag, bool):
            raise ValueError(f"option global_loss must be True or False, got {flag!r} ({type(flag).__name__})")
        configs["tla"] = dataclasses.replace(configs["tla"], global_loss=flag)
        configs["cma"] = dataclasses.replace(configs["cma"], global_loss=flag)
    return QuestOptions(**configs)


def later_stages_pending(model: nn.Module, stage: str) -> bool:
    """True if the model's method has stages after ``stage`` that have not run yet (they need the FP teacher)."""
    h = handle(model)
    try:
        names = [s.name for s in method_stages(h.method)]
    except ValueError:
        return False
    if stage not in names:
        return False
    return any(n not in h.stages for n in names[names.index(stage) + 1 :])


def _record(model: nn.Module, stage: str, stats: dict[str, Any]) -> None:
    handle(model).extra.setdefault("calibration", {})[stage] = stats


def _finish_finetuning(model: nn.Module, stage: str) -> None:
    if not later_stages_pending(model, stage):
        release_teacher_copies(model)


def _rounds_on_integers(model: nn.Module) -> bool:
    """Whether BRECQ/AdaRound applies: it learns integer roundings, which FP8 (e4m3) weights do not have (they keep
    round to nearest; TLA and CMA still finetune them through the fp8 fake quantizer)."""
    return handle(model).config.weight.format == "int"


def _brecq_stage(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> None:
    if not _rounds_on_integers(model):
        logger.warning("BRECQ skipped: AdaRound rounds on an integer grid, and the weights are FP8 (e4m3); they keep "
                       "round-to-nearest")
        _record(model, "brecq", {"units": 0, "skipped": "fp8 weights"})
        return
    config = resolve_options(ctx.options, handle(model).method).brecq
    results = reconstruct(model, calib, config, device=ctx.device, batch_size=ctx.batch_size, progress=ctx.progress,
                          seed=ctx.seed, parts=ctx.parts)
    _record(model, "brecq", {
        "units": len(results),
        "rtn_loss": sum(r.rtn_loss for r in results),
        "loss": sum(r.loss for r in results),
        "improved_units": sum(r.loss < r.rtn_loss for r in results),
    })


def _tla_stage(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> None:
    config = resolve_options(ctx.options, handle(model).method).tla
    result = run_tla(model, calib, config, device=ctx.device, progress=ctx.progress, seed=ctx.seed)
    _record(model, "tla", result.summary())
    _finish_finetuning(model, "tla")


def _cma_stage(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> None:
    config = resolve_options(ctx.options, handle(model).method).cma
    result = run_cma(model, calib, config, device=ctx.device, progress=ctx.progress, seed=ctx.seed)
    _record(model, "cma", result.summary())
    _finish_finetuning(model, "cma")


def _rebuild_tla(model: nn.Module) -> None:
    """Before a finished TLA stage is loaded on resume, keep the original time-embedding weights as the teacher's
    for the stages that still have to run (the checkpoint holds the finetuned ones)."""
    if later_stages_pending(model, "tla"):
        keep_teacher_copies(model, layers_with_roles(model, TIME_EMBEDDING_ROLES))


def _settings_of(stage: str) -> Any:
    def settings(model: nn.Module, ctx: StageContext) -> dict[str, Any]:
        return dataclasses.asdict(getattr(resolve_options(ctx.options, handle(model).method), stage))
    return settings


def _check_options(info: Preflight) -> None:
    resolve_options(info.ctx.options, info.ctx.method)  # malformed values fail here, before any stage runs


def _check_tla(info: Preflight) -> None:
    check_tla_roles(info.model, info.adapter, info.layers, resolve_options(info.ctx.options, info.ctx.method).tla)


def _check_cma(info: Preflight) -> None:
    config = resolve_options(info.ctx.options, info.ctx.method).cma
    family = detect_family(info.model, info.adapter, info.layers, info.calib, info.ctx.device)
    critical_roles(info.model, info.adapter, info.layers, family, config)  # raises, or warns of the sensitivity fallback


def _rebuild_brecq(model: nn.Module) -> None:
    if _rounds_on_integers(model):
        rebuild_adaround(model)


def _estimate_brecq(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> float:
    if not _rounds_on_integers(model):
        return 0.0
    config = resolve_options(ctx.options, handle(model).method).brecq
    _, _, capture_s, iterations_s = estimate_reconstruction(model, calib, config, device=ctx.device,
                                                            batch_size=ctx.batch_size, seed=ctx.seed)
    return capture_s + iterations_s


def _estimate_tla(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> float:
    config = resolve_options(ctx.options, handle(model).method).tla
    return plan_seconds(model, calib, tla_plan(model, calib, config, ctx.seed), ctx.device)


def _estimate_cma(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> float:
    config = resolve_options(ctx.options, handle(model).method).cma
    return plan_seconds(model, calib, cma_plan(model, calib, config, ctx.seed), ctx.device)


BRECQ = Stage("brecq", _brecq_stage, _rebuild_brecq, _settings_of("brecq"), options=("brecq",), check=_check_options,
              estimate=_estimate_brecq)
TLA = Stage("tla", _tla_stage, _rebuild_tla, _settings_of("tla"), options=("tla", "global_loss"), check=_check_tla,
            estimate=_estimate_tla)
CMA = Stage("cma", _cma_stage, settings=_settings_of("cma"), options=("cma", "global_loss"), check=_check_cma,
            estimate=_estimate_cma)

register_method("qdiffusion", [WEIGHT_INIT, BRECQ, ACT_INIT])
register_method("quest", [WEIGHT_INIT, BRECQ, ACT_INIT, TLA, CMA])
register_method("quest-tla", [WEIGHT_INIT, BRECQ, ACT_INIT, TLA])
register_method("quest-cma", [WEIGHT_INIT, BRECQ, ACT_INIT, CMA])

# the options each method reads (the CLI and benchmarks ask which stage flags apply)
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {m: method_options(m) for m in ("qdiffusion", "quest", "quest-tla", "quest-cma")}
