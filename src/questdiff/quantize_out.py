"""What ``questdiff quantize`` finds in an existing ``--out`` and may reuse: calibration data only when it was
collected with this command's collection options (and fits this model), a fake-quant checkpoint only as the
result of this same run (its stage records say so), and never another kind of checkpoint.

A rerun of the same command resumes (or, finished, reloads) what is there; a rerun with other options is refused
naming the option, instead of silently mixing runs.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import torch

from .cli_common import check_out_kind
from .folders import FAKE_QUANT_CONFIG


def collection_settings(pipe: Any, args: argparse.Namespace, prompts: list[str] | None) -> dict[str, Any]:
    """The options the calibration set depends on, keyed by their command-line names, with the pipeline's defaults
    filled in (so ``--steps 20`` and no ``--steps`` on a 20-step pipeline are the same). ``--batch-size`` is not
    one: sample ``i`` gets seed ``seed + i`` whatever the batching."""
    from .pipelines import call_default, sampler_steps

    guidance = args.guidance if args.guidance is not None else call_default(pipe, "guidance_scale")
    return {
        "calib-samples": args.calib_samples,
        "calib-steps": args.calib_steps,
        "samples-per-step": args.samples_per_step,
        "steps": sampler_steps(pipe, args.steps),
        "guidance": float(guidance) if isinstance(guidance, (int, float)) else None,
        "seed": args.seed,
        "prompts": None if prompts is None else hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
    }


def _shown(option: str, value: Any) -> str:
    if option == "prompts":
        return "other prompts" if value is not None else "no --prompts"
    return f"--{option} {value}" if value is not None else f"no --{option}"


def check_reused_calibration(calib: Any, saved: dict[str, Any] | None, wanted: dict[str, Any], unet: Any, path: Path,
                             device: torch.device) -> None:
    """Calibration data found in ``--out`` must have been collected with ``wanted`` (``collection_settings``; files
    of older versions carry no ``saved`` settings: only their timestep count is checked) and fit this model: one
    forward on one row catches another model's data (shapes, channels, dtype) before any stage runs."""
    fix = _fix(path.parent)
    if saved is None:
        calib_steps = wanted["calib-steps"]
        if calib_steps is not None and len(calib.timesteps) != calib_steps:
            raise ValueError(f"--calib-steps {calib_steps}: {path} holds {len(calib.timesteps)} calibrated timesteps; "
                             f"{fix}")
    else:
        for option, value in wanted.items():
            if saved.get(option) != value:
                raise ValueError(f"--{option}: {path} was collected with {_shown(option, saved.get(option))}, this run "
                                 f"asks for {_shown(option, value)}; {fix}")
    try:
        calib.validate(unet)
        with torch.no_grad():
            unet(**calib.model_kwargs(torch.arange(1), device))
    except (ValueError, RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} does not fit this model ({reason}); {fix}") from None


def _has_stage_records(out: Path) -> bool:
    from .calibration.methods import has_stage_records

    return has_stage_records(out / "work")


def _fix(out: Path) -> str:
    """How to get other calibration data into ``out``: recollect, unless stages computed from the data there would be
    orphaned by it (their records refuse other data: a new run needs a folder of its own)."""
    if _has_stage_records(out):
        return f"use another --out, or delete {out} to start over (its stages were computed from that data)"
    return "pass --recollect to sample new calibration data, or use another --out"


def check_out(out: str | Path, recollect: bool = False) -> None:
    """Before anything loads: ``--out`` holds no deployed checkpoint; a fake-quant checkpoint there is the result of
    a ``questdiff quantize`` run into this folder (it has the run's stage records, which a rerun checks against its
    settings), not a model saved there otherwise, which the run would overwrite; and ``--recollect`` is refused where
    stages were computed from the calibration data it would replace."""
    out = Path(out)
    check_out_kind(out, "fake-quant")
    records = _has_stage_records(out)
    if (out / FAKE_QUANT_CONFIG).is_file() and not records:
        raise ValueError(f"--out {out}: holds a quantized model that no questdiff quantize run into this folder made "
                         "(no stage records in work/), which this run would overwrite; choose another --out")
    if recollect and records:
        raise ValueError(f"--recollect: {out} holds stages computed from its calibration data, which new data would "
                         f"not match; use another --out, or delete {out} to start over")
