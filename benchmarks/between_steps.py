"""Activation ranges between calibrated steps (#22): what sampling at steps that have no quantizer row of their own
costs, and what each way of covering them gives back.

Every model is calibrated on DDIM trajectories of ``--steps`` (50) steps, ``--calib-steps`` (20) of them calibrated
(the README's generic recipe), and quantized RTN. Variants:

- ``before``: rows from the calibrated steps only (the behaviour before #22: ``select(keep_range_steps=False)``);
- ``widen`` (the default): each row's ranges are the union of its calibrated step's and those of the other recorded
  steps mapped to it (``quantize(range_steps="widen")``);
- ``rows``: a row of its own for every recorded step (``quantize(range_steps="rows")``; for RTN the same model as
  calibrating every step, only finetuning would differ);
- ``interpolate``: the ``rows`` model with every uncalibrated row replaced by the linear interpolation (in t) of the
  ranges of its two calibrated neighbours (benchmark only: how far interpolation alone gets);
- ``all``: every recorded step calibrated (the 50/50 reference).

Quality, per sampler (DDIM ``--steps``, DPM-Solver++ and Euler with ``--other-steps``): PSNR of the quantized samples
against the FP samples of the same seeds (the tutorial model: over the whole trajectory, every step's ``x``), and
the denoiser's relative error ``|eps_q - eps| / |eps|`` on the FP trajectory's inputs, mean and worst over the steps.

    python benchmarks/between_steps.py                                   # tutorial UNet + the three zoo models
    python benchmarks/between_steps.py --zoo fmnist-ldm-cond --no-tutorial
    python benchmarks/between_steps.py --quick                           # smoke run (the tutorial model, tiny)

Writes ``between_steps-<models>[-quick].json`` and ``.md`` to ``--out`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import questdiff as qd
from questdiff import pipelines
from questdiff.calibration import CalibrationSet
from questdiff.calibration.activations import covered_range
from questdiff.config import ActivationSpec, QuantConfig, WeightSpec
from questdiff.io_utils import atomic_write_text
from questdiff.prepare import act_quantizers, handle
from questdiff.primitives import qparams_from_range

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tutorial UNet lives with the tests
import tutorial_unet  # noqa: E402

logger = logging.getLogger("between_steps")
VARIANTS = ("before", "widen", "rows", "interpolate", "all")
SAMPLERS = ("ddim", "dpm++", "euler")
MIN_MAX_16 = QuantConfig(weight=WeightSpec(bits=16), activation=ActivationSpec(bits=16, scale_method="minmax"),
                         first_last_act_bits=None, name="W16A16-minmax")


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    return float(10 * torch.log10(peak**2 / ((a.float() - b.float()) ** 2).mean()))


def interpolate_rows(model: torch.nn.Module, calibrated: list[float]) -> None:
    """Replace the rows of uncalibrated timesteps of a ``range_steps="rows"`` model by the linear interpolation, in t,
    of the ranges its two calibrated neighbours cover (both exist: the first and last steps are calibrated)."""
    keys = list(handle(model).schedule.timesteps)
    with torch.no_grad():
        for q in act_quantizers(model).values():
            lo, hi = covered_range(q, q.scale, q.zero_point)
            for row, t in enumerate(keys):
                if t in calibrated:
                    continue
                above, below = min(c for c in calibrated if c > t), max(c for c in calibrated if c < t)
                w = (t - below) / (above - below)
                a, b = keys.index(above), keys.index(below)
                q.set_row(row, *qparams_from_range(w * lo[a] + (1 - w) * lo[b], w * hi[a] + (1 - w) * hi[b], q.bits,
                                                   q.symmetric, q.always_zero))


def calibration_of(variant: str, recorded: CalibrationSet, calib_steps: int) -> tuple[CalibrationSet, str]:
    """The calibration set and ``range_steps`` choice of a variant."""
    if variant == "all":
        return recorded, "widen"
    calib = recorded.select(calib_steps, keep_range_steps=variant != "before")
    return calib, "rows" if variant in ("rows", "interpolate") else "widen"


def quantize_variant(fp: torch.nn.Module, config: Any, recorded: CalibrationSet, variant: str, calib_steps: int,
                     **kwargs: Any) -> tuple[torch.nn.Module, float]:
    calib, range_steps = calibration_of(variant, recorded, calib_steps)
    start = time.perf_counter()
    model = qd.quantize(copy.deepcopy(fp), config, calib, range_steps=range_steps, progress=False, **kwargs)
    if variant == "interpolate":
        interpolate_rows(model, calib.timesteps)
    return model, time.perf_counter() - start


def denoiser_error(model: torch.nn.Module, fp: torch.nn.Module, inputs: CalibrationSet,
                   output: Callable[[Any], torch.Tensor]) -> tuple[float, float]:
    """Mean and worst over the sampler steps of ``|eps_q - eps| / |eps|`` on the FP trajectory's recorded inputs."""
    errors = []
    with torch.no_grad():
        for t in inputs.timesteps:
            kwargs = inputs.model_kwargs(torch.nonzero(inputs.ts == t).flatten())
            ref = output(fp(**kwargs))
            errors.append(float((output(model(**kwargs)) - ref).norm() / ref.norm()))
    return sum(errors) / len(errors), max(errors)


# -- the DDPM-tutorial-style UNet ------------------------------------------------------------------------------------
def tutorial_case(args: argparse.Namespace) -> list[dict[str, Any]]:
    fp = tutorial_unet.train(args.train_steps)
    with qd.record_calibration(fp, "t") as rec:
        tutorial_unet.sample(fp, tutorial_unet.scheduler(), args.steps, n=args.calib_samples or 64, seed=100)
    recorded = rec.result()
    samplers = {"ddim": (tutorial_unet.scheduler(), args.steps)}
    if not args.quick:
        config = tutorial_unet.scheduler().config
        samplers.update({name: (pipelines.SCHEDULERS[name][0].from_config(config, **pipelines.SCHEDULERS[name][1]),
                                args.other_steps) for name in ("dpm++", "euler")})
    references = {}
    for name, (sampler, steps) in samplers.items():
        with qd.record_calibration(fp, "t") as rec:
            trajectory = tutorial_unet.sample(fp, sampler, steps, n=args.num_samples, seed=1, trajectory=True)
        references[name] = (trajectory, rec.result())
    rows = []
    for config in ([MIN_MAX_16] if args.quick else [MIN_MAX_16, qd.presets.W8A8]):
        for variant in args.variants:
            model, seconds = quantize_variant(fp, config, recorded, variant, args.calib_steps,
                                              adapter=qd.GenericAdapter("t"))
            for name, (sampler, steps) in samplers.items():
                trajectory, inputs = references[name]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the coverage warning of the other samplers: what is measured
                    out = tutorial_unet.sample(model, sampler, steps, n=args.num_samples, seed=1, trajectory=True)
                    mean, worst = denoiser_error(model, fp, inputs, lambda y: y)
                rows.append({"model": "tutorial-unet", "config": config.label, "variant": variant, "sampler": name,
                             "steps": steps, "psnr_db": round(psnr(out, trajectory, 2.0), 2),
                             "psnr_final_db": round(psnr(out[-1], trajectory[-1], 2.0), 2),
                             "denoiser_error_mean": round(mean, 4), "denoiser_error_max": round(worst, 4),
                             "quantize_s": round(seconds, 1)})
                logger.info("%s", rows[-1])
    return rows


# -- the zoo ---------------------------------------------------------------------------------------------------------
def zoo_case(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    pipe = qd.zoo.load(name)
    pipelines.quiet(pipe)
    fp = copy.deepcopy(pipe.unet)
    original = pipe.scheduler
    pipelines.set_scheduler(pipe, "ddim")
    recorded = qd.collect_calibration(pipe, num_samples=args.calib_samples or 16, num_inference_steps=args.steps,
                                      progress=False)

    def run(sampler: str, steps: int) -> tuple[torch.Tensor, CalibrationSet]:
        pipe.scheduler = original
        pipelines.set_scheduler(pipe, sampler)
        with qd.record_calibration(pipe.unet) as rec:
            kwargs = pipelines.call_kwargs(pipe, 0, args.num_samples, 1000, num_inference_steps=steps,
                                           output_type="pt")
            images = pipe(**kwargs).images
        return images, rec.result()

    samplers = {s: args.steps if s == "ddim" else args.other_steps for s in SAMPLERS}
    references = {s: run(s, steps) for s, steps in samplers.items()}
    rows = []
    for variant in args.variants:
        pipe.unet, seconds = quantize_variant(fp, qd.presets.W8A8, recorded, variant, args.calib_steps)
        for sampler, steps in samplers.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                images, _ = run(sampler, steps)
                mean, worst = denoiser_error(pipe.unet, fp, references[sampler][1], _sample_of)
            rows.append({"model": name, "config": "W8A8", "variant": variant, "sampler": sampler, "steps": steps,
                         "psnr_final_db": round(psnr(images, references[sampler][0], 1.0), 2),
                         "denoiser_error_mean": round(mean, 4), "denoiser_error_max": round(worst, 4),
                         "quantize_s": round(seconds, 1)})
            logger.info("%s", rows[-1])
    return rows


def _sample_of(output: Any) -> torch.Tensor:
    """A diffusers denoiser's output: pipelines call it with ``return_dict=False`` (a tuple)."""
    return output[0] if isinstance(output, tuple) else output.sample


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | config | variant | sampler | PSNR vs FP (dB) | denoiser error mean / max | quantize (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['psnr_db']} (final {r['psnr_final_db']})" if "psnr_db" in r else f"{r['psnr_final_db']}"
        lines.append(f"| {r['model']} | {r['config']} | {r['variant']} | {r['sampler']} {r['steps']} | {value} | "
                     f"{r['denoiser_error_mean']:.4f} / {r['denoiser_error_max']:.4f} | {r['quantize_s']} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", nargs="*", default=["fmnist-ldm-cond", "fmnist-ldm", "mnist-ddpm"])
    p.add_argument("--no-tutorial", action="store_true", help="skip the DDPM-tutorial-style UNet")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of calibration and of the DDIM rows")
    p.add_argument("--calib-steps", type=int, default=20)
    p.add_argument("--other-steps", type=int, default=20, help="steps of the DPM-Solver++ and Euler rows")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration trajectories (tutorial 64, zoo 16)")
    p.add_argument("--num-samples", type=int, default=16, help="evaluated samples (seeds 1000..; tutorial: seed 1)")
    p.add_argument("--train-steps", type=int, default=300, help="tutorial UNet training steps (the tests' 300)")
    p.add_argument("--quick", action="store_true", help="smoke run: the tutorial model only, tiny budget")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.zoo, args.steps, args.calib_steps, args.num_samples, args.train_steps = [], 10, 4, 2, 20
        args.calib_samples = args.calib_samples or 8
        args.variants = ["before", "widen"]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    rows = [] if args.no_tutorial else tutorial_case(args)
    for name in args.zoo:
        rows += zoo_case(name, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = ([] if args.no_tutorial else ["tutorial"]) + args.zoo
    stem = "-".join(["between_steps", *models]) + ("-quick" if args.quick else "")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    atomic_write_text(out / f"{stem}.json", json.dumps({"settings": settings, "rows": rows}, indent=2))
    atomic_write_text(out / f"{stem}.md", "\n".join([f"Settings: `{json.dumps(settings)}`", "", *table(rows)]) + "\n")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
