"""Honest time in the long stages: BRECQ says what it will take before its units run and its bar moves every
AdaRound iteration; finetuning (TLA/CMA) estimates its whole plan from its first timed steps."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from questdiff.calibration import brecq, timing
from questdiff.calibration.brecq import BrecqConfig, reconstruct, reconstruction_units
from questdiff.calibration.timing import StepClock, format_seconds
from questdiff.calibration.weights import init_weights
from questdiff.config import preset
from questdiff.prepare import prepare
from questdiff.timestep import TimestepSchedule


class RecordingBar:
    """Stands in for tqdm: keeps the total and every update."""

    made: list["RecordingBar"] = []

    def __init__(self, iterable=None, total=None, **kwargs):
        self.total, self.updates, self.iterable, self.n = total, [], iterable, 0
        RecordingBar.made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        self.n += n
        self.updates.append(n)

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def test_brecq_estimates_first_and_its_bar_moves_every_iteration(unet, calib, monkeypatch, caplog):
    prepare(unet, preset("W4A8"), TimestepSchedule.from_timesteps(calib.timesteps))
    init_weights(unet)
    units = len(reconstruction_units(unet, calib, torch.device("cpu")))
    monkeypatch.setattr(brecq, "tqdm", RecordingBar)
    RecordingBar.made.clear()
    with caplog.at_level(logging.INFO, logger="questdiff.calibration.brecq"):
        reconstruct(unet, calib, BrecqConfig(iters=5, batch_size=8), batch_size=32)
    bar, = RecordingBar.made
    # per unit: one move after its capture, one per iteration, one top-up to exactly one unit
    assert bar.total == units and len(bar.updates) == units * (1 + 5 + 1)
    assert sum(bar.updates) == pytest.approx(units) and all(u > 0 for u in bar.updates[:6])
    messages = [r.getMessage() for r in caplog.records]
    first = next(i for i, m in enumerate(messages) if "on this device" in m)
    assert re.match(rf"BRECQ/AdaRound: {units} units x 5 iterations on {len(calib)} rows: about \d", messages[first])
    took = next(m for m in messages if m.startswith("BRECQ/AdaRound: took"))
    assert first < messages.index(took) and "(estimated" in took


def test_brecq_estimate_is_within_a_factor_of_the_measured_time(unet, calib):
    """The estimate comes from timed passes of the model: it must land near the real reconstruction time (a wide
    band, since the test machine is shared)."""
    import time

    prepare(unet, preset("W4A8"), TimestepSchedule.from_timesteps(calib.timesteps))
    init_weights(unet)
    device = torch.device("cpu")
    config = BrecqConfig(iters=30, batch_size=8)
    units = reconstruction_units(unet, calib, device)
    parts = brecq._select_rows(unet, calib, None, 0)
    capture, iterations = brecq.estimate_seconds(unet, calib, units, parts, config, device, 32)
    start = time.perf_counter()
    reconstruct(unet, calib, config, batch_size=32, progress=False)
    measured = time.perf_counter() - start
    assert capture > 0 and iterations > 0
    print("BRECQ estimate", capture, iterations, "measured", measured)
    assert measured / 4 < capture + iterations < measured * 4, (capture, iterations, measured)


def test_step_clock_extrapolates_from_the_timed_steps(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    clock = StepClock("TLA", total=1000, measure=3)
    with caplog.at_level(logging.INFO, logger="questdiff.calibration.timing"):
        for step, seconds in enumerate([5.0, 2.0, 2.0, 2.0, 2.0]):  # a slow first step, then 2 s each
            now[0] += seconds
            clock.tick(step, torch.device("cpu"))
        clock.done()
    assert clock.estimate == 5.0 + 2.0 * 999
    assert caplog.records[0].getMessage() == (
        "TLA: 1000 steps, about 33.4 min on this device (2 s per step, timed over steps 2-4)")
    assert caplog.records[1].getMessage() == "TLA: took 13 s (estimated 33.4 min)"


@pytest.mark.parametrize("seconds, text", [(42, "42 s"), (348, "5.8 min"), (8640, "2.4 h")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_finetuning_logs_its_estimate_before_the_long_part(unet, calib, caplog):
    from questdiff.calibration import TLAConfig, run_tla
    from questdiff.calibration.activations import init_activations

    prepare(unet, preset("W4A8"), TimestepSchedule.from_timesteps(calib.timesteps))
    init_weights(unet)
    init_activations(unet, calib, progress=False)
    with caplog.at_level(logging.INFO, logger="questdiff.calibration.timing"):
        run_tla(unet, calib, TLAConfig(epochs=2, samples_per_t=4, batch_size=2), progress=False)
    estimate, took = [r.getMessage() for r in caplog.records]
    assert re.match(r"\S+: \d+ steps, about .* on this device", estimate) and "took" in took


def test_quest_logs_the_whole_runs_estimate_before_its_first_stage(unet, calib, tmp_path, caplog):
    """One total for the long stages comes first; a resumed run estimates only what is left to do."""
    import questdiff as qd

    options = {"brecq": {"iters": 20, "batch_size": 8}, "tla": {"epochs": 2, "samples_per_t": 4, "batch_size": 2},
               "cma": {"epochs": 2, "samples_per_t": 4, "batch_size": 2}}
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="questdiff.calibration.methods"):
        qd.quantize(unet, "W4A8", calib, method="quest", work_dir=tmp_path, progress=False, batch_size=32, **options)
    messages = [r.getMessage() for r in caplog.records]
    plan = re.fullmatch(r"quest: about (.+) on this device for brecq, tla, cma \(brecq (.+), tla (.+), cma (.+)\), "
                        r"from timed passes of the model; the other stages are short", messages[0])
    assert plan, messages[0]
    assert all(m.startswith("stage ") for m in messages[1:])  # logged before the first stage ran
    (tmp_path / "stages" / "04-cma.json").unlink()  # as if killed during CMA
    (tmp_path / "stages" / "04-cma.safetensors").unlink()
    fresh = type(unet)(**unet.config)  # the FP model again
    fresh.load_state_dict(base)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="questdiff.calibration.methods"):
        qd.quantize(fresh, "W4A8", calib, method="quest", work_dir=tmp_path, progress=False, batch_size=32, **options)
    assert re.fullmatch(r"quest: about .+ for cma \(cma .+\), .+", caplog.records[0].getMessage())
