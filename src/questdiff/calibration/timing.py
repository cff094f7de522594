"""Honest time for the long calibration stages: time a few real passes on the device, extrapolate, say it once
before the long part runs, and compare with the measured time at the end."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

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
