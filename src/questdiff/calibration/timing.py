"""Honest time for the long calibration stages: time a few real passes on the device, extrapolate, say it once
before the long part runs, and compare with the measured time at the end."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from .common import output_tensor
from .data import CalibrationSet

logger = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``"42 s"``, ``"5.8 min"``, ``"2.4 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 2) -> float:
    """Seconds of one ``fn()`` on ``device``: the fastest of ``repeat`` runs after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


class StepClock:
    """Times the first steps of a loop of ``total`` steps and logs, once, what the whole loop will take.

    Step 0 is a warm-up (allocations, lazy initialisation); steps ``1 .. measure`` are timed. Call ``tick(step,
    device)`` after each step and ``done()`` at the end (logs the measured time beside the estimate)."""

    def __init__(self, name: str, total: int, measure: int = 3) -> None:
        self.name, self.total, self.measure = name, total, measure
        self.start = time.perf_counter()
        self.first: float | None = None
        self.estimate: float | None = None

    def tick(self, step: int, device: torch.device) -> None:
        if self.estimate is not None or self.total <= self.measure + 1:
            return
        if step == 0:
            synchronize(device)
            self.first = time.perf_counter()
        elif step == self.measure and self.first is not None:
            synchronize(device)
            per_step = (time.perf_counter() - self.first) / self.measure
            self.estimate = (self.first - self.start) + per_step * (self.total - 1)
            logger.info("%s: %d steps, about %s on this device (%.3g s per step, timed over steps 2-%d)",
                        self.name, self.total, format_seconds(self.estimate), per_step, self.measure + 1)

    def done(self) -> None:
        if self.estimate is not None:
            logger.info("%s: took %s (estimated %s)", self.name, format_seconds(time.perf_counter() - self.start),
                        format_seconds(self.estimate))


def forward_backward_seconds(model: nn.Module, calib: CalibrationSet, rows: torch.Tensor, device: torch.device) -> float:
    """Seconds of one forward and backward pass of the whole ``model`` (quantizers as they are) on the calibration
    ``rows`` (indices ``[B]``), on ``device``: the fastest of two after a warm-up."""
    sample = calib.model_kwargs(rows, device)
    x = sample[calib.sample_key].detach().clone().requires_grad_(True)

    def step() -> None:
        out = output_tensor(model(**{**sample, calib.sample_key: x}))
        torch.autograd.grad(out.float().pow(2).mean(), x)

    with torch.enable_grad():
        return timed(step, device)


def forward_seconds(model: nn.Module, calib: CalibrationSet, rows: torch.Tensor, device: torch.device) -> float:
    """Seconds of one forward pass of ``model`` on the calibration ``rows`` without gradients (fastest of two)."""
    sample = calib.model_kwargs(rows, device)
    with torch.no_grad():
        return timed(lambda: model(**sample), device)
