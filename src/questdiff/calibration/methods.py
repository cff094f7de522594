"""Quantization methods as ordered, resumable stages.

A method is a list of ``Stage(name, run)``; ``run(model, calib, ctx)`` fills parameters of a prepared model.
With a ``work_dir`` every finished stage's state is saved (``work_dir/stages/<nn>-<name>.safetensors``, by rank 0
when several processes run) and a restarted run loads it instead of recomputing, so a killed calibration resumes
where it stopped. Each saved stage carries a signature (base weights, calibration set, quantization config, seed,
and the settings of it and every stage before it): resuming from a folder made with other settings is refused
instead of silently mixing runs. A long stage also keeps its finished parts as they finish (``StageProgress``: BRECQ's
units), so a run killed inside it resumes there. Once the caller has saved the final model, ``finish_stages``
replaces the stage files by one record pointing at it: a rerun with the same settings loads that model instead of
recomputing. Each stage logs its wall time and peak memory. New methods (QuEST) register more stages with
``register_method``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .. import distributed
from ..adapters import LayerInfo, ModelAdapter
from ..checkpoint import load_state, metadata, save_state
from ..digest import file_digest
from ..io_utils import atomic_write_text, ensure_writable_dir
from ..prepare import handle, weights_digest
from .activations import init_activations
from .data import CalibrationSet
from .smoothing import smooth_model
from .timing import format_seconds
from .weights import init_weights

logger = logging.getLogger(__name__)


FINISHED = "finished.json"  # in the stage folder once the final model is saved: what replaced the stage files
PARTS = "parts.json"


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class StageProgress:
    """The finished parts of the running stage (e.g. BRECQ's units), each saved as it finishes into
    ``<stage file>.parts/`` (the part's module state, and its notes in ``parts.json`` with the stage's signature),
    so that a run killed inside the stage resumes after its last finished part, with the same result. Parts saved
    by a run with other settings are refused like a stage file. Without a folder (no ``work_dir``) nothing is kept.
    Rank 0 writes; every rank reads the same files."""

    def __init__(self, directory: Path | None = None, signature: dict[str, Any] | None = None) -> None:
        self.directory = directory
        self.signature = _json(signature or {})
        self._parts: dict[str, Any] = distributed.on_main(self._read) if directory is not None else {}

    def _read(self) -> dict[str, Any]:
        assert self.directory is not None
        path = self.directory / PARTS
        if not path.is_file():
            return {}
        saved = json.loads(path.read_text())
        differences = _differences(saved.get("signature"), self.signature)
        if differences:
            raise ValueError(f"{self.directory} was made with other settings than this run ({'; '.join(differences[:4])}); "
                             f"use another work directory, or delete {self.directory.parent} to start over")
        return saved["parts"]

    def notes(self, key: str) -> dict[str, Any] | None:
        """The notes saved with part ``key``, or ``None`` if it has not finished."""
        return self._parts.get(key)

    def load(self, key: str, module: nn.Module) -> None:
        """Restore part ``key`` onto ``module``, which must have the structure it had when saved."""
        assert self.directory is not None
        load_state(module, self.directory / f"{key}.safetensors")

    def save(self, key: str, module: nn.Module, notes: dict[str, Any]) -> None:
        """Keep ``module``'s state and ``notes`` as finished part ``key`` (no-op without a folder)."""
        if self.directory is None:
            return
        self._parts[key] = _json(notes)

        def write() -> None:
            assert self.directory is not None
            save_state(module, ensure_writable_dir(self.directory) / f"{key}.safetensors")
            atomic_write_text(self.directory / PARTS, json.dumps({"signature": self.signature, "parts": self._parts},
                                                                 indent=2))
        distributed.on_main(write)

    def clear(self) -> None:
        """Remove the parts (the finished stage's own file holds them now)."""
        if self.directory is not None:
            distributed.on_main(lambda: shutil.rmtree(self.directory, ignore_errors=True))
        self._parts = {}


@dataclass
class StageContext:
    """Run-time settings shared by all stages of one ``quantize`` call; ``parts`` is the running stage's."""

    device: torch.device
    batch_size: int = 64
    progress: bool = True
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    report: list[dict[str, Any]] = field(default_factory=list)
    method: str = ""
    parts: StageProgress = field(default_factory=StageProgress)


@dataclass(frozen=True)
class Preflight:
    """What a stage's ``check`` sees before ``prepare`` touches the model: the FP model, its adapter, the roles the
    adapter gives its layers, the calibration data and the run's context (``ctx.method``, ``ctx.options``)."""

    model: nn.Module
    adapter: ModelAdapter
    layers: dict[str, LayerInfo]
    calib: CalibrationSet
    ctx: StageContext


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[nn.Module, CalibrationSet, StageContext], None]
    # called before loading a checkpoint written after this stage (structure changes such as AdaRound)
    rebuild: Callable[[nn.Module], None] | None = None
    # the JSON-able settings its result depends on beyond the run's (e.g. its resolved config), for resume checks
    settings: Callable[[nn.Module, StageContext], dict[str, Any]] | None = None
    # the ``quantize(**options)`` keys it reads
    options: tuple[str, ...] = ()
    # raises (naming the fix) if the stage cannot run on this model and options; runs before the first stage does
    check: Callable[[Preflight], None] | None = None
    # seconds the stage will take on ctx.device, from timed passes (long stages only; the short ones have none)
    estimate: Callable[[nn.Module, CalibrationSet, StageContext], float] | None = None


_METHODS: dict[str, list[Stage]] = {}


def register_method(name: str, stages: list[Stage]) -> None:
    _METHODS[name] = list(stages)


def method_stages(name: str) -> list[Stage]:
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}: choose one of {sorted(_METHODS)}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_options(name: str) -> tuple[str, ...]:
    """The ``quantize(**options)`` keys ``name``'s stages read, in stage order."""
    return tuple(dict.fromkeys(o for stage in method_stages(name) for o in stage.options))


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the accepted options (and the methods that take the others) if ``options`` has a
    key no stage of ``method`` reads."""
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if not unknown:
        return
    elsewhere = {o: [m for m in sorted(_METHODS) if o in method_options(m)] for o in unknown}
    hints = "; ".join(f"{o} is read by method {', '.join(map(repr, ms))}" for o, ms in elsewhere.items() if ms)
    raise ValueError(f"unknown option(s) {unknown} for method {method!r}: it accepts {list(allowed) or 'no options'}"
                     + (f" ({hints})" if hints else ""))


def preflight(model: nn.Module, adapter: ModelAdapter, calib: CalibrationSet, method: str, ctx: StageContext) -> None:
    """Check the options and every stage's preconditions of ``method`` on the FP ``model`` before anything runs, so
    a run fails in seconds instead of after hours of earlier stages."""
    check_options(method, ctx.options)
    info = Preflight(model, adapter, adapter.layers(model), calib, ctx)
    for stage in method_stages(method):
        if stage.check is not None:
            stage.check(info)


def rebuild_structure(model: nn.Module) -> None:
    """Re-create structural changes of the stages already run (used by ``load``)."""
    h = handle(model)
    if h.method not in _METHODS:
        return
    for stage in _METHODS[h.method]:
        if stage.name in h.stages and stage.rebuild is not None:
            stage.rebuild(model)


def _peak_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _run_signature(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> dict[str, Any]:
    h = handle(model)
    return {"base_weights": weights_digest(model), "calibration": calib.digest(), "quant_config": h.config.to_dict(),
            "schedule": h.schedule.to_dict(), "seed": ctx.seed}


def _differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(saved) | set(wanted), key=str)
                for d in _differences(saved.get(k), wanted.get(k), f"{prefix}{k}.")]
    if isinstance(saved, list) and isinstance(wanted, list) and len(saved) == len(wanted):
        return [d for i, (a, b) in enumerate(zip(saved, wanted)) for d in _differences(a, b, f"{prefix}{i}.")]
    return [] if saved == wanted else [f"{prefix.rstrip('.')}: saved {saved!r}, now {wanted!r}"]


def _resumable(path: Path, signature: dict[str, Any]) -> bool:
    """Whether the finished stage at ``path`` can be loaded; raises if it was made with other settings."""
    info = path.with_suffix(".json")
    if not info.is_file():  # killed between the two writes: the stage did not finish
        logger.warning("stage file %s has no %s beside it: running the stage again", path, info.name)
        return False
    saved = json.loads(info.read_text()).get("signature")
    differences = _differences(saved, _json(signature))
    if differences:
        raise ValueError(
            f"{path} was made with other settings than this run ({'; '.join(differences[:4])}); use another work "
            f"directory, or delete {path.parent} to start over"
        )
    return True


def log_time_plan(model: nn.Module, calib: CalibrationSet, method: str, ctx: StageContext,
                  stage_dir: Path | None = None) -> dict[str, float]:
    """Estimate every long stage of ``method`` that has no finished file in ``stage_dir`` yet and log the total once,
    before the first stage runs (each stage logs its own estimate again, and its measured time, when it runs).
    Returns ``{stage: seconds}``."""
    pending = [(number, stage) for number, stage in enumerate(method_stages(method)) if stage.estimate is not None
               and not (stage_dir is not None and (stage_dir / f"{number:02d}-{stage.name}.json").is_file())]
    if not pending:
        return {}
    with torch.no_grad():
        seconds = {stage.name: stage.estimate(model, calib, ctx) for _, stage in pending}  # type: ignore[misc]
    logger.info("%s: about %s on this device for %s (%s), from timed passes of the model; the other stages are short",
                method, format_seconds(sum(seconds.values())), ", ".join(seconds),
                ", ".join(f"{name} {format_seconds(s)}" for name, s in seconds.items()))
    return seconds


def run_stages(
    model: nn.Module, calib: CalibrationSet, method: str, ctx: StageContext, work_dir: str | Path | None = None
) -> None:
    """Run ``method``'s stages on a prepared ``model``, resuming finished ones (and finished parts of the one that
    was running) from ``work_dir``, or loading the final model a finished run with the same settings saved."""
    h = handle(model)
    h.method = method
    stages = method_stages(method)
    stage_dir = ensure_writable_dir(Path(work_dir) / "stages") if work_dir is not None else None
    run = _run_signature(model, calib, ctx) if stage_dir else {}
    settings = {stage.name: stage.settings(model, ctx) if stage.settings is not None else {} for stage in stages}
    if stage_dir is not None and distributed.on_main(lambda: _finished_weights(stage_dir, {"run": run, "stages": settings})):
        _load_finished(model, stage_dir, stages, ctx)
        return
    log_time_plan(model, calib, method, ctx, stage_dir)
    signature: dict[str, Any] = {"run": run, "stages": {}}
    for number, stage in enumerate(stages):
        path = stage_dir / f"{number:02d}-{stage.name}.safetensors" if stage_dir else None
        signature["stages"][stage.name] = settings[stage.name]
        if path is not None and distributed.on_main(lambda: path.is_file() and _resumable(path, signature)):
            if stage.rebuild is not None:
                stage.rebuild(model)
            load_state(model, path)
            h.stages.append(stage.name)
            logger.info("stage %s: resumed from %s", stage.name, path)
            ctx.report.append({"stage": stage.name, "resumed": True})
            continue
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        start = time.perf_counter()
        ctx.parts = StageProgress(path.with_suffix(".parts") if path is not None else None, signature)
        stage.run(model, calib, ctx)
        distributed.broadcast_module(model)  # every rank continues from rank 0's result (see distributed.py)
        seconds = time.perf_counter() - start
        h.stages.append(stage.name)
        entry = {"stage": stage.name, "seconds": round(seconds, 3), "peak_memory_mib": _peak_memory(ctx.device)}
        ctx.report.append(entry)
        logger.info("stage %s: %.1f s%s", stage.name, seconds,
                    f", peak {entry['peak_memory_mib']:.0f} MiB" if entry["peak_memory_mib"] is not None else "")
        if path is not None:
            distributed.on_main(lambda: _save_stage(model, path, entry, signature))
        ctx.parts.clear()
        ctx.parts = StageProgress()


def _stage_files(stage_dir: Path) -> list[Path]:
    """The stage files and part folders in ``stage_dir`` (named ``<nn>-<stage>...``)."""
    return sorted(p for p in stage_dir.glob("[0-9][0-9]-*")) if stage_dir.is_dir() else []


def has_stage_records(work_dir: str | Path) -> bool:
    """Whether ``work_dir`` holds anything of a ``run_stages`` run: stage files, parts, or a finished record."""
    stage_dir = Path(work_dir) / "stages"
    return bool(_stage_files(stage_dir)) or (stage_dir / FINISHED).is_file()


def progress_summary(work_dir: str | Path) -> list[str]:
    """What ``work_dir`` keeps for a resume, in words: ``["2 finished stage(s) (weight_init, brecq)",
    "20 finished part(s) of brecq"]`` (empty if nothing finished)."""
    stage_dir = Path(work_dir) / "stages"
    files = _stage_files(stage_dir)
    stages = [p.stem.split("-", 1)[1] for p in files if p.suffix == ".json"]
    out = [f"{len(stages)} finished stage(s) ({', '.join(stages)})"] if stages else []
    for folder in files:
        if folder.suffix == ".parts" and (folder / PARTS).is_file():
            count = len(json.loads((folder / PARTS).read_text()).get("parts", {}))
            out.append(f"{count} finished part(s) of {folder.stem.split('-', 1)[1]}")
    return out


def finish_stages(work_dir: str | Path, weights: str | Path) -> None:
    """After the final model is saved to ``weights`` (a ``save_state`` / ``questdiff.save`` weights file): replace
    the stage files in ``work_dir`` by a record of the run's signature and that file's digest (the stage files are
    model-sized each). A rerun with the same settings then loads ``weights`` (``run_stages``)."""
    stage_dir = Path(work_dir) / "stages"
    files = _stage_files(stage_dir)
    last = [p for p in files if p.suffix == ".json"] or [stage_dir / FINISHED]  # a run that loaded its record
    if not last[-1].is_file():
        return
    signature = json.loads(last[-1].read_text())["signature"]
    record = {"signature": signature, "weights": os.path.relpath(weights, stage_dir), "digest": file_digest(weights)}
    atomic_write_text(stage_dir / FINISHED, json.dumps(record, indent=2))
    for path in files:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _finished_weights(stage_dir: Path, signature: dict[str, Any]) -> bool:
    """Whether ``stage_dir`` records a finished run with ``signature`` whose final weights are still there as saved;
    raises if it records a run with other settings."""
    info = stage_dir / FINISHED
    if not info.is_file():
        return False
    record = json.loads(info.read_text())
    differences = _differences(record.get("signature"), _json(signature))
    if differences:
        raise ValueError(f"{info} records a finished run with other settings than this one "
                         f"({'; '.join(differences[:4])}); use another work directory, or delete {stage_dir} to start over")
    weights = stage_dir / record["weights"]
    if not weights.is_file() or file_digest(weights) != record["digest"]:
        logger.warning("%s: the final model it records (%s) is gone or was changed since: running the stages again",
                       info, weights)
        return False
    return True


def _load_finished(model: nn.Module, stage_dir: Path, stages: list[Stage], ctx: StageContext) -> None:
    """Give ``model`` the structure of every stage and the state of the finished run's final model."""
    weights = stage_dir / json.loads((stage_dir / FINISHED).read_text())["weights"]
    h = handle(model)
    h.stages = [stage.name for stage in stages]
    rebuild_structure(model)
    load_state(model, weights)
    ctx.report.extend({"stage": stage.name, "resumed": True} for stage in stages)
    logger.info("%s: finished before with these settings: loaded its final model %s", h.method, weights)


def _save_stage(model: nn.Module, path: Path, entry: dict[str, Any], signature: dict[str, Any]) -> None:
    save_state(model, path)
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps({**metadata(model), "report": entry, "signature": signature}, indent=2, default=str))


def share_stages(source_dir: str | Path, target_dir: str | Path, method: str, upto: str) -> bool:
    """Copy the finished stages of ``method`` up to and including ``upto`` from one work dir into another, so a
    second method with the same first stages (qdiffusion and every quest variant share weight_init, brecq and
    act_init) resumes them instead of recomputing; their signatures still guard against other settings.
    Returns False (copying nothing) when ``source_dir`` has not finished ``upto`` yet."""
    names = [stage.name for stage in method_stages(method)]
    if upto not in names:
        raise ValueError(f"method {method!r} has no stage {upto!r}: its stages are {names}")
    source, target = Path(source_dir) / "stages", ensure_writable_dir(Path(target_dir) / "stages")
    wanted = [f"{i:02d}-{name}{suffix}" for i, name in enumerate(names[: names.index(upto) + 1])
              for suffix in (".safetensors", ".json")]
    if not all((source / name).is_file() for name in wanted):
        return False
    for name in wanted:
        if not (target / name).exists():
            shutil.copy2(source / name, target / name)
    return True


def _weights_stage(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> None:
    if handle(model).config.activation.smoothing is not None:  # the weight grids are those of the smoothed weight
        smooth_model(model, calib, ctx.device, ctx.batch_size, ctx.progress)
    init_weights(model)


def _activations_stage(model: nn.Module, calib: CalibrationSet, ctx: StageContext) -> None:
    init_activations(model, calib, device=ctx.device, batch_size=ctx.batch_size, progress=ctx.progress)


WEIGHT_INIT = Stage("weight_init", _weights_stage)
ACT_INIT = Stage("act_init", _activations_stage)

register_method("rtn", [WEIGHT_INIT, ACT_INIT])
