"""Cost of QuEST's calibration stages at the paper's scale, measured on random-weight models of the real architectures
and projected to the paper's full iteration counts (speed does not depend on the weight values).

Architectures:
- ``ldm4``: an LDM-4-architecture ``UNet2DModel`` (64x64x3 latent, model channels 224, mult (1, 2, 3, 4), two res
  blocks per level, self-attention at 32/16/8 with 32-channel heads; 274M parameters), the LSUN-Bedrooms setting;
- ``sd15``: an SD-1.5-architecture ``UNet2DConditionModel`` (diffusers' default SD config with
  cross_attention_dim 768, 64x64x4 latents, 77 context tokens; 860M parameters).

For each: weight init, BRECQ/AdaRound over every unit with a few iterations (capture time per calibration row and
time per iteration, per unit), activation init, TLA and CMA steps at the code's effective batch (2 and 4) and at a
larger batch. Projections use the paper/code settings of spec §2.5 / §2.8:

=========  ====================  ==========================  ===============================  ==================
model      calibration rows      BRECQ                       TLA                              CMA
=========  ====================  ==========================  ===============================  ==================
ldm4       20 t x 256 = 5120     20k iters/unit, batch 16    20 t x 200 ep x 8 rows = 16k     20 ep x 20 t x 64
                                                             steps of 2                       rows = 6.4k of 4
sd15       25 t x 128 x 2 = 6400 20k iters/unit, batch 4     3,850 steps of 2                 8k steps of 4
=========  ====================  ==========================  ===============================  ==================

Run on the GPU machine: ``python benchmarks/quest_cost.py --device cuda --autocast``; CPU smoke run:
``python benchmarks/quest_cost.py --quick``. Writes ``quest_cost[-quick].json`` and ``.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from architectures import build_ldm4, build_sd15  # benchmarks/ is on sys.path when run as a script
from questdiff.calibration import BrecqConfig, CalibrationSet, CMAConfig, TLAConfig
from questdiff.calibration.activations import init_activations
from questdiff.calibration.brecq import reconstruct
from questdiff.calibration.cma import cma_objective, critical_layers
from questdiff.calibration.common import generator
from questdiff.calibration.finetune import Objective, finetune, plan_batches
from questdiff.calibration.tla import tla_objective
from questdiff.calibration.weights import init_weights
from questdiff.config import preset
from questdiff.io_utils import atomic_write_text
from questdiff.prepare import prepare
from questdiff.timestep import TimestepSchedule

logger = logging.getLogger("quest_cost")


@dataclass(frozen=True)
class PaperScale:
    """The paper/code workload of one setting (spec §2.5, §2.8)."""

    calib_rows: int
    timesteps: int
    brecq_iters: int
    brecq_batch: int
    act_init_rows_per_t: int
    tla_steps: int
    tla_batch: int
    cma_steps: int
    cma_batch: int


PAPER = {
    "ldm4": PaperScale(5120, 20, 20000, 16, 64, 16000, 2, 6400, 4),
    "sd15": PaperScale(6400, 25, 20000, 4, 64, 3850, 2, 8000, 4),
}


ARCHITECTURES: dict[str, tuple[Callable[[bool], nn.Module], str]] = {"ldm4": (build_ldm4, "W4A8"), "sd15": (build_sd15, "W4A8")}


def synthetic_calibration(model: nn.Module, timesteps: int, rows_per_t: int, seed: int = 0) -> CalibrationSet:
    """N(0, 1) latents (and contexts) at ``timesteps`` evenly spaced t, ``rows_per_t`` rows each."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    n = timesteps * rows_per_t
    ts = torch.linspace(981, 1, timesteps).round()
    inputs = {
        "sample": torch.randn(n, config.in_channels, config.sample_size, config.sample_size, generator=g),
        "timestep": ts.repeat_interleave(rows_per_t),
    }
    if isinstance(model, UNet2DConditionModel):
        tokens = 77 if config.cross_attention_dim == 768 else 8
        inputs["encoder_hidden_states"] = torch.randn(n, tokens, config.cross_attention_dim, generator=g)
    return CalibrationSet(inputs, torch.arange(timesteps).repeat_interleave(rows_per_t), "sample", "timestep")


class Meter:
    """Wall time and peak memory (CUDA allocated, MiB) of a block; CPU peak memory is not tracked."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return out, time.perf_counter() - start, torch.cuda.max_memory_allocated(self.device) / 2**20
        return out, time.perf_counter() - start, None


def time_steps(model: nn.Module, calib: CalibrationSet, objective: Objective, batch_size: int, steps: int,
               device: torch.device, use_autocast: bool, meter: Meter) -> dict[str, Any]:
    """Seconds per finetuning step (teacher forward + student forward/backward + Adam) at ``batch_size``."""
    rows = len(calib) // len(calib.timesteps)
    plan = plan_batches(model, calib, samples_per_t=min(batch_size, rows), epochs=steps + 1, batch_size=batch_size,
                        resample=True, order="shuffled", generator=generator(0, 7))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kwargs = {"weight_lr": 1e-5, "act_lr": 1e-4, "device": device, "use_autocast": use_autocast, "progress": False}
    effective = min(batch_size, rows)
    try:
        finetune(model, calib, objective, plan[:1], **kwargs)  # warm-up
        _, seconds, peak = meter(lambda: finetune(model, calib, objective, plan[1 : steps + 1], **kwargs))
    except torch.OutOfMemoryError as err:  # a finding, not a crash: the other stages' numbers stand
        logger.warning("batch %d does not fit: %s", effective, str(err).split(".")[0])
        return {"batch": effective, "error": "out of memory"}
    finally:
        model.load_state_dict(state)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"batch": effective, "steps": steps, "seconds_per_step": seconds / steps,
            "samples_per_second": effective * steps / seconds, "peak_memory_mib": peak}


def measure(arch: str, args: argparse.Namespace, on_stage: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """Measure one architecture and project the paper's workload to hours; ``on_stage(report)`` after each stage
    (so a run cut short keeps what it measured)."""

    def done(name: str) -> None:
        logger.info("%s %s: %s", arch, name, {k: v for k, v in report["stages"][name].items() if not isinstance(v, dict)})
        on_stage(report)

    build, preset_name = ARCHITECTURES[arch]
    device = torch.device(args.device)
    meter = Meter(device)
    torch.manual_seed(0)
    model = build(args.quick).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    calib = synthetic_calibration(model, args.timesteps, args.rows_per_t)
    paper = PAPER[arch]
    prepare(model, preset(preset_name), TimestepSchedule.from_timesteps(calib.timesteps))
    report: dict[str, Any] = {"architecture": arch, "parameters_m": round(params / 1e6, 1), "preset": preset_name,
                              "device": str(device), "autocast": args.autocast, "measured_rows": len(calib), "stages": {}}
    _, seconds, peak = meter(lambda: init_weights(model))
    report["stages"]["weight_init"] = {"seconds": seconds, "peak_memory_mib": peak, "projected_hours": seconds / 3600}
    done("weight_init")

    brecq = BrecqConfig(iters=args.recon_iters, batch_size=paper.brecq_batch)
    results, seconds, peak = meter(lambda: reconstruct(model, calib, brecq, device=device, batch_size=args.capture_batch,
                                                       progress=not args.quiet))
    capture_per_row = sum(r.capture_seconds for r in results) / len(calib)
    iter_seconds = sum(r.train_seconds / max(r.iters, 1) for r in results)
    projected = capture_per_row * paper.calib_rows + iter_seconds * paper.brecq_iters
    report["stages"]["brecq"] = {
        "units": len(results), "seconds": seconds, "peak_memory_mib": peak,
        "capture_seconds_per_row_all_units": capture_per_row, "iteration_seconds_all_units": iter_seconds,
        "projected_hours": projected / 3600,
        "projection": f"{paper.calib_rows} rows captured + {paper.brecq_iters} iterations x batch {paper.brecq_batch} per unit",
    }
    done("brecq")

    _, seconds, peak = meter(lambda: init_activations(model, calib, device=device, progress=not args.quiet))
    per_row = seconds / len(calib)
    report["stages"]["act_init"] = {"seconds": seconds, "peak_memory_mib": peak,
                                    "projected_hours": per_row * paper.timesteps * paper.act_init_rows_per_t / 3600}
    done("act_init")

    tla = tla_objective(model, TLAConfig())
    family, layers = critical_layers(model, calib, CMAConfig(), device=device)
    cma = cma_objective(model, layers, family, CMAConfig())
    for name, objective, steps, batch in (("tla", tla, paper.tla_steps, paper.tla_batch), ("cma", cma, paper.cma_steps, paper.cma_batch)):
        code = time_steps(model, calib, objective, batch, args.steps, device, args.autocast, meter)
        rows = len(calib) // len(calib.timesteps)
        same = min(args.large_batch, rows) == code["batch"]
        big = code if same else time_steps(model, calib, objective, args.large_batch, args.steps, device, args.autocast, meter)
        passes = steps * batch
        report["stages"][name] = {
            "trained_layers": len(objective.weight_layers), "trained_scales": len(objective.act_quantizers),
            "code_batch": code, "large_batch": big,
            "projected_hours": _hours(steps, code.get("seconds_per_step")),
            "projected_hours_large_batch": _hours(passes, 1 / big["samples_per_second"] if "error" not in big else None),
            "projection": f"{steps} steps x batch {batch} ({passes} sample passes)",
        }
        done(name)
    stages = report["stages"]
    report["projected_total_hours"] = _total(s["projected_hours"] for s in stages.values())
    report["projected_total_hours_large_batch"] = _total(
        s.get("projected_hours_large_batch", s["projected_hours"]) for s in stages.values())
    if args.quick:
        report["note"] = "quick mode: tiny architectures on synthetic data; the projection is only a smoke test"
    return report


def _hours(count: int, seconds_each: float | None) -> float | None:
    return None if seconds_each is None else count * seconds_each / 3600


def _total(hours: Iterable[float | None]) -> float | None:
    """Sum of stage hours; None when a stage could not be measured (out of memory)."""
    known = list(hours)
    return None if None in known else sum(h for h in known if h is not None)


def _fmt(value: float | None) -> str:
    return "OOM" if value is None else f"{value:.3g}"


def markdown(reports: list[dict[str, Any]]) -> str:
    lines = ["# QuEST calibration cost (projected to the paper's iteration counts)", "",
             "| model | params (M) | device | stage | measured s | peak MiB | projected h | projected h (large batch) | peak MiB (large batch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        for name, s in r["stages"].items():
            measured = s.get("seconds", s.get("code_batch", {}).get("seconds_per_step"))
            peak = s.get("peak_memory_mib") or s.get("code_batch", {}).get("peak_memory_mib")
            large = s.get("projected_hours_large_batch", s["projected_hours"])
            large_peak = s.get("large_batch", {}).get("peak_memory_mib")
            lines.append(f"| {r['architecture']} | {r['parameters_m']} | {r['device']} | {name} | {_fmt(measured)} | "
                         f"{'-' if peak is None else f'{peak:.0f}'} | {_fmt(s['projected_hours'])} | {_fmt(large)} | "
                         f"{'-' if large_peak is None else f'{large_peak:.0f}'} |")
        if "projected_total_hours" in r:  # absent while the architecture is being measured
            lines.append(f"| {r['architecture']} | | | **total** | | | {_fmt(r['projected_total_hours'])} | "
                         f"{_fmt(r['projected_total_hours_large_batch'])} | |")
    lines += ["", "TLA/CMA 'measured s' and 'peak MiB' are per step at the code's batch (2 / 4); OOM: did not fit.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast in TLA/CMA (CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny architectures and minimal work (CPU smoke run)")
    p.add_argument("--timesteps", type=int, default=None, help="calibrated timesteps measured (default 4; quick 2)")
    p.add_argument("--rows-per-t", type=int, default=None, help="calibration rows per timestep (default 16; quick 2)")
    p.add_argument("--recon-iters", type=int, default=None, help="AdaRound iterations measured per unit (default 20; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="TLA/CMA steps measured (default 10; quick 1)")
    p.add_argument("--large-batch", type=int, default=None, help="the larger finetuning batch (default 16; quick 2)")
    p.add_argument("--capture-batch", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    defaults = {"timesteps": (2, 4), "rows_per_t": (2, 16), "recon_iters": (1, 20), "steps": (1, 10), "large_batch": (2, 16)}
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    stem = "quest_cost-quick" if args.quick else "quest_cost"
    reports: list[dict[str, Any]] = []

    def write(every: list[dict[str, Any]]) -> None:
        atomic_write_text(out / f"{stem}.json", json.dumps(every, indent=2))
        atomic_write_text(out / f"{stem}.md", markdown(every))

    for arch in args.arch:
        logger.info("measuring %s", arch)
        reports.append(measure(arch, args, lambda partial: write(reports + [partial])))
        write(reports)
    print(markdown(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
