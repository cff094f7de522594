"""``collect_calibration``: sample with the FP pipeline and keep its denoiser's inputs (data-free calibration)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed, pipelines
from .data import CalibrationSet, record_calibration, stride_filter

logger = logging.getLogger(__name__)


@torch.no_grad()
def collect_calibration(
    pipe: Any,
    num_samples: int = 64,
    calib_steps: int | None = None,
    *,
    num_inference_steps: int | None = None,
    samples_per_step: int | None = None,
    range_samples: int = 64,
    batch_size: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    prompts: Sequence[str] | None = None,
    timestep_argument: str | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> CalibrationSet:
    """Run ``pipe`` for ``num_samples`` trajectories and return the denoiser inputs of ``calib_steps`` sampler steps
    spread over the whole trajectory, the first and the last included (``spread_steps``; all steps if ``None``), at
    most ``samples_per_step`` rows per step.

    The other sampler steps of the first ``range_samples`` trajectories are kept as ``range_steps`` (only activation
    init reads them: each calibrated row's ranges then also hold on the steps mapped to it); ``0`` keeps the
    calibrated steps only.

    With classifier-free guidance each step records both the conditional and the unconditional rows (the spec's
    cond + uncond duplication). Sampler settings (steps, guidance, eta) default to the pipeline's own.

    In a process group (``torchrun``) each rank samples a contiguous block of the ``batch_size`` batches and every
    rank returns the whole set, identical to one process's (same batches, seeds and row order).
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    if calib_steps is not None and calib_steps < 1:
        raise ValueError(f"calib_steps must be >= 1 (or None for every sampler step), got {calib_steps}")
    denoiser = pipelines.denoiser_of(pipe)
    batch_size = batch_size or min(num_samples, 64)
    pipelines.quiet(pipe)
    batches = distributed.sample_batches(num_samples, batch_size)
    bar = tqdm(total=sum(count for _, count in batches), desc="calibration samples", unit="img",
               bar_format=pipelines.IMAGE_BAR_FORMAT, disable=not progress or not distributed.is_main())
    keep = None  # the calibrated steps' filter, known after the first trajectory
    with record_calibration(denoiser, timestep_argument) as recorder:
        for number, (start, count) in enumerate(batches):
            if keep is not None:
                recorder.keep_step = _every_step if start < range_samples else keep
            kwargs = pipelines.call_kwargs(
                pipe,
                start,
                count,
                seed,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                prompts=prompts,
                extra=call_kwargs,
            )
            with pipelines.step_progress(pipe, bar, count):  # the bar moves every sampler step
                pipe(**kwargs)
            if keep is None:  # the first run tells how many denoiser calls a trajectory takes
                keep = stride_filter(recorder.calls_per_run, calib_steps)
                if start >= range_samples:
                    recorder.drop_rows(keep)
                logger.info("sampler makes %d denoiser calls per trajectory", recorder.calls_per_run)
    bar.close()
    # every rank recorded a contiguous block of batches: in rank order they are the one-process rows
    parts = distributed.gather(recorder.result() if batches else None)
    calib = CalibrationSet.concat([part for part in parts if part is not None])
    calls = int(calib.steps.max()) + 1  # the last step is always kept: a trajectory's denoiser calls, on every rank
    steps = calib_steps if calib_steps is not None and calib_steps < calls else None
    if steps is not None or samples_per_step is not None:  # the recorded other steps become range_steps
        calib = calib.select(steps, samples_per_step, seed)
    logger.info(
        "calibration set: %d rows over %d timesteps (%s), %d range-only rows",
        len(calib),
        len(calib.timesteps),
        ", ".join(f"{t:g}" for t in calib.timesteps[:6]) + (" ..." if len(calib.timesteps) > 6 else ""),
        0 if calib.range_steps is None else len(calib.range_steps),
    )
    return calib


def _every_step(step: int) -> bool:
    return True

