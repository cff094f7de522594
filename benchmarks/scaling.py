"""Multi-GPU scaling of questdiff's stages: throughput on N processes (one per GPU, torchrun) for calibration
collection, BRECQ/AdaRound (its per-unit capture and its iterations), TLA, CMA and evaluation sampling, on a zoo
model and on the LDM-4-architecture UNet (random weights: speed does not depend on the values), and the LDM-4 full
pipeline projected to the paper's counts (``quest_cost.PAPER``) on N GPUs.

Each run measures one world size and merges its numbers into ``scaling.json`` / ``scaling.md`` in ``--out`` (rank 0
writes), so running it for 1, 2 and 4 GPUs builds the table with the speedups::

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 1 benchmarks/scaling.py
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/scaling.py
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 4 benchmarks/scaling.py

CPU smoke run (gloo, tiny settings; writes ``scaling-quick.*``)::

    torchrun --standalone --nproc-per-node 2 benchmarks/scaling.py --quick

Throughputs are timed on every rank between barriers and the slowest rank counts. What is split over ranks:
collection and sampling by sampling batch (the samples are the one-process samples), BRECQ's capture by batch and
its iterations by the rows of each batch, TLA/CMA by the rows of each batch (a batch of 2 gives a 4-GPU run two idle
ranks). Weight and activation initialisation run on every rank (they are seconds).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMPipeline, DDIMScheduler
from torch import nn

from architectures import build_ldm4  # benchmarks/ is on sys.path when run as a script
from quest_cost import PAPER, Meter, time_steps
from questdiff import distributed, pipelines, zoo
from questdiff.calibration import BrecqConfig, CalibrationSet, CMAConfig, TLAConfig, collect_calibration
from questdiff.calibration.activations import init_activations
from questdiff.calibration.brecq import reconstruct
from questdiff.calibration.cma import cma_objective, critical_layers
from questdiff.calibration.tla import tla_objective
from questdiff.calibration.weights import init_weights
from questdiff.config import preset
from questdiff.eval.sampling import generate
from questdiff.io_utils import atomic_write_text
from questdiff.prepare import prepare
from questdiff.timestep import TimestepSchedule

logger = logging.getLogger("scaling")

LDM4_TRAJECTORY_STEPS = 200  # LSUN-Bedrooms LDM-4 samples with DDIM 200 steps (spec §1); calibration keeps 20


def build_pipeline(model: str, quick: bool, device: torch.device) -> Any:
    """``"zoo"``: the embedded default zoo pipeline; ``"ldm4"``: a DDIM pipeline around the LDM-4 UNet (its 64x64x3
    latents stand for the images: the VAE is not part of the calibration cost)."""
    if model == "zoo":
        pipe = zoo.load(zoo.DEFAULT_MODEL)
    else:
        torch.manual_seed(0)
        pipe = DDIMPipeline(unet=build_ldm4(quick), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipelines.quiet(pipe)
    return pipe.to(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time on the slowest rank (every rank starts together)."""
    distributed.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, max(distributed.gather(time.perf_counter() - start))


def count_rows(model: nn.Module) -> list[int]:
    """A counter of the rows ``model`` runs (first argument's batch size), on this rank."""
    count = [0]

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(iter(kwargs.values()))
        count[0] += first.shape[0]

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return count


def measure(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every stage's throughput for ``model`` on this run's ranks."""
    s = SETTINGS[model]["quick" if args.quick else "full"]
    device = torch.device(args.device)
    pipe = build_pipeline(model, args.quick, device)
    unet = pipelines.denoiser_of(pipe)
    rows = count_rows(unet)
    generate(pipe, s["batch"] * distributed.world_size(), batch_size=s["batch"], num_inference_steps=2, desc="warm-up")
    stages: dict[str, Any] = {}

    rows[0] = 0
    calib, seconds = timed(lambda: collect_calibration(pipe, s["samples"], s["calib_steps"], batch_size=s["batch"],
                                                       num_inference_steps=s["steps"], progress=False), device)
    denoiser_rows = sum(distributed.gather(rows[0]))
    stages["collection"] = {"seconds": seconds, "samples": s["samples"], "steps": s["steps"],
                            "denoiser_rows_per_second": denoiser_rows / seconds,
                            "rows_per_trajectory": denoiser_rows / s["samples"], "throughput": s["samples"] / seconds,
                            "unit": "trajectories/s"}
    done(model, "collection", stages)

    images, seconds = timed(lambda: generate(pipe, s["images"], batch_size=s["batch"], num_inference_steps=s["steps"],
                                             desc="sampling"), device)
    stages["sampling"] = {"seconds": seconds, "images": len(images), "throughput": len(images) / seconds,
                          "unit": "images/s"}
    done(model, "sampling", stages)
    stages.update(calibration_stages(unet, calib, args, device))
    report = {"model": model, "world": distributed.world_size(), "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
              "calibration_rows": len(calib), "stages": stages}
    if model == "ldm4":
        report["projection"] = projection(stages)
    return report


def calibration_stages(unet: nn.Module, calib: CalibrationSet, args: argparse.Namespace,
                       device: torch.device) -> dict[str, Any]:
    """Weight init, BRECQ, activation init, TLA and CMA of ``unet`` (W4A4) on ``calib``."""
    stages: dict[str, Any] = {}
    prepare(unet, preset("W4A4"), TimestepSchedule.from_timesteps(calib.timesteps))
    _, seconds = timed(lambda: init_weights(unet), device)
    stages["weight_init"] = {"seconds": seconds}

    config = BrecqConfig(iters=args.recon_iters, batch_size=PAPER["ldm4"].brecq_batch)
    results, seconds = timed(lambda: reconstruct(unet, calib, config, device=device, batch_size=args.capture_batch,
                                                 progress=False), device)
    capture = max(distributed.gather(sum(r.capture_seconds for r in results)))
    iteration = max(distributed.gather(sum(r.train_seconds / max(r.iters, 1) for r in results)))
    stages["brecq_capture"] = {"seconds": capture, "rows": len(calib), "units": len(results),
                               "throughput": len(calib) / capture, "unit": "rows/s (all units)"}
    stages["brecq_iterations"] = {"seconds_per_iteration": iteration, "batch": config.batch_size,
                                  "throughput": 1 / iteration, "unit": "iterations/s (all units)"}
    stages["brecq"] = {"seconds": seconds}
    done("", "brecq", stages)

    _, seconds = timed(lambda: init_activations(unet, calib, device=device, progress=False), device)
    stages["act_init"] = {"seconds": seconds, "rows": len(calib)}
    meter = Meter(device)
    tla = tla_objective(unet, TLAConfig())
    family, layers = critical_layers(unet, calib, CMAConfig(), device=device)
    cma = cma_objective(unet, layers, family, CMAConfig())
    for name, objective, batch in (("tla", tla, PAPER["ldm4"].tla_batch), ("cma", cma, PAPER["ldm4"].cma_batch)):
        for label, size in (("", batch), ("_large_batch", args.large_batch)):
            distributed.barrier()
            step = time_steps(unet, calib, objective, size, args.steps, device, args.autocast, meter)
            if "error" not in step:
                seconds = max(distributed.gather(step["seconds_per_step"]))
                step.update(seconds_per_step=seconds, samples_per_second=step["batch"] / seconds,
                            throughput=step["batch"] / seconds, unit="rows/s")
            stages[name + label] = step
        done("", name, stages)
    return stages


def projection(stages: dict[str, Any]) -> dict[str, Any]:
    """Hours of the LDM-4 W4A4 pipeline at the paper's counts from this run's throughputs (None: did not fit)."""
    paper = PAPER["ldm4"]
    collection = stages["collection"]
    trajectories = paper.calib_rows // paper.timesteps  # 256 samples, each a full 200-step DDIM trajectory
    per_trajectory = collection["seconds"] / collection["samples"] * LDM4_TRAJECTORY_STEPS / collection["steps"]
    hours = {
        "collection": trajectories * per_trajectory / 3600,
        "weight_init": stages["weight_init"]["seconds"] / 3600,
        "brecq": (paper.calib_rows / stages["brecq_capture"]["throughput"]
                  + paper.brecq_iters * stages["brecq_iterations"]["seconds_per_iteration"]) / 3600,
        "act_init": stages["act_init"]["seconds"] / stages["act_init"]["rows"] * paper.timesteps
        * paper.act_init_rows_per_t / 3600,
    }
    for name, steps, batch in (("tla", paper.tla_steps, paper.tla_batch), ("cma", paper.cma_steps, paper.cma_batch)):
        code, large = stages[name], stages[name + "_large_batch"]
        hours[name] = steps * code["seconds_per_step"] / 3600 if "error" not in code else None
        hours[name + "_large_batch"] = (steps * batch / large["samples_per_second"] / 3600 if "error" not in large
                                        else None)

    def total(names: list[str]) -> float | None:
        values = [hours[n] for n in names]
        return None if None in values else sum(values)

    core = ["weight_init", "brecq", "act_init"]
    hours["total"] = total(["collection", *core, "tla", "cma"])
    hours["total_large_batch"] = total(["collection", *core, "tla_large_batch", "cma_large_batch"])
    return {"hours": hours, "counts": f"{trajectories} trajectories x {LDM4_TRAJECTORY_STEPS} DDIM steps; "
            f"{paper.calib_rows} rows; BRECQ {paper.brecq_iters} iterations x batch {paper.brecq_batch} per unit; "
            f"TLA {paper.tla_steps} x {paper.tla_batch}; CMA {paper.cma_steps} x {paper.cma_batch} (large batch: "
            "the same rows in batches of --large-batch)"}


def done(model: str, stage: str, stages: dict[str, Any]) -> None:
    logger.info("%s %s: %s", model, stage, {k: v for k, v in stages.items() if k.startswith(stage)})


SETTINGS = {  # per model: quick (CPU smoke) and full (GPU) workloads
    "zoo": {"quick": {"samples": 4, "batch": 2, "steps": 2, "calib_steps": 2, "images": 4},
            "full": {"samples": 256, "batch": 64, "steps": 20, "calib_steps": 4, "images": 2000}},
    "ldm4": {"quick": {"samples": 4, "batch": 2, "steps": 2, "calib_steps": 2, "images": 4},
             "full": {"samples": 64, "batch": 16, "steps": 10, "calib_steps": 4, "images": 64}},
}
THROUGHPUT_STAGES = ("collection", "sampling", "brecq_capture", "brecq_iterations", "tla", "tla_large_batch", "cma",
                     "cma_large_batch")


def markdown(runs: list[dict[str, Any]]) -> str:
    worlds = sorted({r["world"] for r in runs})
    lines = ["# Multi-GPU scaling (throughput on N processes, one per GPU)", ""]
    for model in sorted({r["model"] for r in runs}):
        by_world = {r["world"]: r for r in runs if r["model"] == model}
        first = by_world[min(by_world)]
        lines += [f"## {model} ({first['parameters_m']} M parameters, {first['device']})", "",
                  "| stage | unit | " + " | ".join(f"{w} proc" for w in worlds) + " | "
                  + " | ".join(f"speedup {w}" for w in worlds if w > 1) + " |",
                  "|---|---|" + "---|" * (2 * len(worlds) - (1 if 1 in worlds else 0))]
        for stage in THROUGHPUT_STAGES:
            values = {w: r["stages"].get(stage, {}).get("throughput") for w, r in by_world.items()}
            unit = next((r["stages"][stage].get("unit") for r in by_world.values() if stage in r["stages"]), "")
            cells = [f"{values[w]:.4g}" if values.get(w) else "-" for w in worlds]
            base = values.get(1)
            speedups = [f"{values[w] / base:.2f}x" if base and values.get(w) else "-" for w in worlds if w > 1]
            label = stage + (f" (batch {first['stages'][stage]['batch']})" if stage.startswith(("tla", "cma")) else "")
            lines.append(f"| {label} | {unit} | " + " | ".join(cells + speedups) + " |")
        projected = {w: r["projection"]["hours"] for w, r in by_world.items() if "projection" in r}
        if projected:
            lines += ["", f"Projected W4A4 pipeline at the paper's counts ({first['projection']['counts']}), hours:", "",
                      "| stage | " + " | ".join(f"{w} proc" for w in sorted(projected)) + " |",
                      "|---|" + "---|" * len(projected)]
            for name in next(iter(projected.values())):
                cells = [f"{projected[w][name]:.3g}" if projected[w][name] is not None else "OOM" for w in sorted(projected)]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["zoo", "ldm4"], choices=["zoo", "ldm4"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny LDM-4 and minimal work (CPU smoke run)")
    p.add_argument("--recon-iters", type=int, default=None, help="AdaRound iterations per unit (default 20; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="TLA/CMA steps measured (default 10; quick 1)")
    p.add_argument("--large-batch", type=int, default=None, help="the larger TLA/CMA batch (default 16; quick 2)")
    p.add_argument("--capture-batch", type=int, default=16)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast in TLA/CMA (CUDA)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    for key, (quick, full) in {"recon_iters": (1, 20), "steps": (1, 10), "large_batch": (2, 16)}.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed.init_from_env()
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        reports = [measure(model, args) for model in args.models]
        if distributed.is_main():
            write(reports, Path(args.out), "scaling-quick" if args.quick else "scaling")
    finally:
        distributed.shutdown()
    return 0


def write(reports: list[dict[str, Any]], out: Path, stem: str) -> None:
    """Merge ``reports`` into ``out/stem.json`` (replacing the same model and world size) and rewrite the table."""
    path = out / f"{stem}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    fresh = {(r["model"], r["world"]) for r in reports}
    runs = [r for r in runs if (r["model"], r["world"]) not in fresh] + reports
    runs.sort(key=lambda r: (r["model"], r["world"]))
    atomic_write_text(path, json.dumps({"runs": runs}, indent=2))
    atomic_write_text(out / f"{stem}.md", markdown(runs))
    print(markdown(runs))


if __name__ == "__main__":
    sys.exit(main())
