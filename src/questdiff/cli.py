"""``questdiff`` command line: quantize, sample, eval, zoo.

Every command takes ``--model`` (a diffusers pipeline folder or a zoo name; default: the embedded zoo model),
shows progress bars, prints a summary table at the end and writes its files into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint, distributed, launch, pipelines
from .io_utils import atomic_write_text, ensure_writable_dir
from .loading import default_device, load_pipeline

logger = logging.getLogger("questdiff")


def _read_prompts(path: str | None) -> list[str] | None:
    """Prompts from a text file (one per line) or a TSV with a ``Prompt`` column (e.g. PartiPrompts.tsv)."""
    if path is None:
        return None
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if lines and "\t" in lines[0] and lines[0].split("\t")[0].lower() == "prompt":
        return [line.split("\t")[0] for line in lines[1:]]
    return lines


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="diffusers pipeline folder or zoo model name (default: the embedded zoo model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default=None, help="prompts file for text-to-image pipelines (one per line, or a TSV with a Prompt column)")
    p.add_argument("--batch-size", type=int, default=64)


def _packed_size_mib(model: torch.nn.Module) -> tuple[float, float]:
    """(FP32 size, size with weights at their quantized bit width) of a quantized denoiser, in MiB."""
    from .prepare import quant_layers

    fp = sum(p.numel() for n, p in model.named_parameters() if "_quantizer." not in n) * 4
    packed = fp
    for layer in quant_layers(model).values():
        packed -= layer.weight.numel() * (4 - layer.weight_quantizer.bits / 8)
    return fp / 2**20, packed / 2**20


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Method options from the iteration flags (only the ones given); raises if the method has no such stage."""
    from .calibration.quest import METHOD_OPTIONS

    flags = {"brecq": ("recon_iters", "iters"), "tla": ("tla_epochs", "epochs"), "cma": ("cma_epochs", "epochs")}
    options: dict[str, Any] = {}
    for stage, (flag, key) in flags.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if stage not in METHOD_OPTIONS.get(args.method, ()):
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to method {args.method!r} (it has no {stage} stage)")
        options[stage] = {key: value}
    if getattr(args, "order", None) is not None:
        stages = [stage for stage in ("tla", "cma") if stage in METHOD_OPTIONS.get(args.method, ())]
        if not stages:
            raise ValueError(f"--order does not apply to method {args.method!r} (it has no TLA/CMA stage)")
        for stage in stages:
            options.setdefault(stage, {})["order"] = args.order
    return options


def cmd_quantize(args: argparse.Namespace) -> int:
    from .api import quantize
    from .calibration import CalibrationSet, collect_calibration
    from .prepare import act_quantizers, handle, quant_layers

    start = time.perf_counter()
    options = _method_options(args)  # fail before any long work
    device = args.device or default_device()
    out = ensure_writable_dir(args.out)
    pipe, name = load_pipeline(args.model, device)
    calib_path = out / "calibration.safetensors"
    if distributed.on_main(lambda: calib_path.is_file() and not args.recollect):
        calib = CalibrationSet.load(calib_path)
        logger.info("reusing calibration data %s (%d rows); --recollect to sample again", calib_path, len(calib))
    else:
        calib = collect_calibration(
            pipe,
            num_samples=args.calib_samples,
            calib_steps=args.calib_steps,
            num_inference_steps=args.steps,
            samples_per_step=args.samples_per_step,
            batch_size=args.batch_size,
            seed=args.seed,
            guidance_scale=args.guidance,
            prompts=_read_prompts(args.prompts),
        )
        distributed.on_main(lambda: calib.save(calib_path))
    unet = pipelines.denoiser_of(pipe)
    quantize(unet, args.preset, calib, args.method, device=device, batch_size=args.batch_size, work_dir=out / "work",
             seed=args.seed, **options)
    distributed.on_main(lambda: checkpoint.save(unet, out))
    h = handle(unet)
    fp_mib, packed_mib = _packed_size_mib(unet)
    summary = {
        "model": name,
        "preset": h.config.label,
        "method": args.method,
        "calibration rows": len(calib),
        "calibrated timesteps": len(h.schedule),
        "quantized layers": len(quant_layers(unet)),
        "activation quantizers": len(act_quantizers(unet)),
        "stages": ", ".join(f"{r['stage']} {'resumed' if r.get('resumed') else str(r['seconds']) + ' s'}" for r in h.extra["report"]),
        "weights FP32 / packed": f"{fp_mib:.2f} MiB / {packed_mib:.2f} MiB",
        "wall time": f"{time.perf_counter() - start:.1f} s",
        "output": str(out),
    }
    if distributed.is_main():
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        print("questdiff quantize: done\n" + _table(list(summary.items())))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .eval.report import save_grid
    from .eval.sampling import generate

    start = time.perf_counter()
    device = args.device or default_device()
    out = ensure_writable_dir(args.out)
    pipe, name = load_pipeline(args.model, device)
    label = "FP"
    if args.quantized:
        unet = checkpoint.load(args.quantized, base=pipelines.denoiser_of(pipe))
        pipelines.set_denoiser(pipe, unet)
        label = checkpoint.read_metadata(args.quantized)["quant_config"].get("name") or "quantized"
    if args.scheduler:
        pipelines.set_scheduler(pipe, args.scheduler)
    pipelines.quiet(pipe)
    images = generate(
        pipe, args.num_images, seed=args.seed, batch_size=args.batch_size, num_inference_steps=args.steps,
        guidance_scale=args.guidance, prompts=_read_prompts(args.prompts), desc=f"sampling {label}",
    )
    grid = save_grid(images, out / "grid.png", nrow=min(8, args.num_images))
    image_dir = ensure_writable_dir(out / "images")
    for i, image in enumerate(images):
        save_grid(image[None], image_dir / f"{i:05d}.png", nrow=1)
    summary = {
        "model": name,
        "weights": label,
        "scheduler": type(pipe.scheduler).__name__,
        "images": f"{len(images)} x {tuple(images.shape[1:])}",
        "seed": args.seed,
        "grid": str(grid),
        "wall time": f"{time.perf_counter() - start:.1f} s",
    }
    print("questdiff sample: done\n" + _table(list(summary.items())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .calibration.finetune import ORDERS
    from .calibration.methods import available_methods

    parser = argparse.ArgumentParser(prog="questdiff", description="QuEST-style low-bit quantization of diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a pipeline's denoiser (data-free calibration from its own samples)")
    _model_args(q)
    q.add_argument("--preset", default="W8A8", help="W8A8, W4A8, W4A4 or any W<bits>A<bits>")
    q.add_argument("--method", default="rtn", choices=available_methods())
    q.add_argument("--calib-samples", type=int, default=64, help="sampling trajectories for calibration data")
    q.add_argument("--calib-steps", type=int, default=None, help="calibrated timesteps, uniformly strided (default: every sampler step)")
    q.add_argument("--samples-per-step", type=int, default=None, help="cap on calibration rows per timestep")
    q.add_argument("--steps", type=int, default=None, help="sampler steps for calibration (default: the pipeline's)")
    q.add_argument("--guidance", type=float, default=None, help="CFG scale for calibration (default: the pipeline's)")
    q.add_argument("--recollect", action="store_true", help="sample calibration data again even if OUT has it")
    q.add_argument("--recon-iters", type=int, default=None, help="BRECQ/AdaRound iterations per block (default 20000)")
    q.add_argument("--tla-epochs", type=int, default=None, help="TLA epochs per timestep (default 200)")
    q.add_argument("--cma-epochs", type=int, default=None, help="CMA epochs over all timesteps (default 20)")
    q.add_argument("--order", default=None, choices=ORDERS,
                   help="TLA/CMA batch order (default 'shuffled', one timestep per step as in the paper; 'mixed' puts "
                        "every timestep in each step: the same rows and epochs in far fewer steps, for GPUs)")
    q.add_argument("--out", default="runs/quantized", help="output folder (checkpoint, calibration data, stage checkpoints)")
    launch.add_argument(q)
    q.set_defaults(func=cmd_quantize)

    s = sub.add_parser("sample", help="sample images from an FP or quantized pipeline")
    _model_args(s)
    s.add_argument("--quantized", default=None, help="folder written by 'questdiff quantize' (default: FP model)")
    s.add_argument("--num-images", type=int, default=16)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--scheduler", default=None, choices=sorted(pipelines.SCHEDULERS), help="swap the sampler")
    s.add_argument("--out", default="runs/samples")
    s.set_defaults(func=cmd_sample)

    for module in ("questdiff.eval.cli", "questdiff.zoo.cli"):
        try:
            register: Callable[[Any], None] = __import__(module, fromlist=["register"]).register
        except (ImportError, AttributeError):
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if launch.requested(args):  # --nproc N: the same command on N ranks under torchrun
            return launch.run_torchrun(argv, args.nproc)
        with launch.rank_context(args):
            return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, OSError, ImportError) as err:
        print(f"questdiff {args.command}: error{launch.rank_prefix()}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
