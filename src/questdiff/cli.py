"""``questdiff`` command line: quantize, sample, eval, zoo.

Every command takes ``--model`` (a diffusers pipeline folder or a zoo name; default: the embedded zoo model),
shows progress bars, prints a summary table at the end and writes its files into ``--out``.

Every input is checked before any long work: a bad one ends the command with exit code 2 and one line
``questdiff <command>: error: ...`` naming the option and the fix; a failed command leaves no empty ``--out``.
Heavy modules (calibration, diffusers models, evaluation) are imported only by the command that needs them, so
``questdiff --help`` and ``questdiff zoo list`` start fast.
"""
from __future__ import annotations

import argparse
import os
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_common import (
    add_nproc_argument,
    alpha_or_off,
    CommandParser,
    Interrupted,
    checkpoint_label,
    command_line,
    finite_float,
    folder,
    load_quantized,
    non_negative_int,
    positive_int,
    run_command,
    table,
)
from .io_utils import atomic_write_text, output_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("questdiff")

SUBCOMMAND_MODULES = ("questdiff.convert_cli", "questdiff.eval.cli", "questdiff.zoo.cli")  # each has register(subparsers)


# -- checks that need no model -------------------------------------------------------------------------------------
def _read_prompts(path: str | None) -> list[str] | None:
    """Prompts from a text file (one per line) or a TSV with a ``Prompt`` column (e.g. PartiPrompts.tsv)."""
    if path is None:
        return None
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--prompts {path} is a folder; pass the prompts file (one prompt per line, or a TSV with a Prompt column)")
    if not file.is_file():
        raise ValueError(f"--prompts {path}: no such prompts file; pass a text file with one prompt per line")
    try:
        lines = [line for line in file.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path} cannot be read as text ({err}); pass a UTF-8 text file") from None
    if lines and "\t" in lines[0] and lines[0].split("\t")[0].lower() == "prompt":
        lines = [line.split("\t")[0] for line in lines[1:]]
    if not lines:
        raise ValueError(f"--prompts {path} holds no prompt; write one prompt per line")
    return lines


def _preset(name: str, rotate: int | None = None, smooth: float | str | None = None) -> Any:
    """The ``QuantConfig`` of ``--preset`` (with ``--rotate``'s input-channel rotation and ``--smooth``'s smoothing,
    ``"off"``: none, so 4-bit activations get QuEST's per-channel grid); raises naming the option."""
    import dataclasses

    from .config import resolve

    try:
        config = resolve(name)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--preset {name!r}: {err}") from None  # the config's message names the fix
    for flag, field, value in (("--rotate", "rotation", rotate), ("--smooth", "smoothing", smooth)):
        if value is None:
            continue
        try:
            config = config.replace(activation=dataclasses.replace(config.activation,
                                                                   **{field: None if value == "off" else value}))
        except ValueError as err:
            raise ValueError(f"{flag} {value:g}: {err}") from None
    return config


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


# -- checks against the loaded pipeline (cheap: before any sampling) -----------------------------------------------
def _check_pipeline_options(pipe: Any, args: argparse.Namespace, prompts: list[str] | None) -> None:
    """Refuse options the pipeline would silently ignore or that contradict it."""
    from .pipelines import call_parameters, sampler_steps

    params = call_parameters(pipe)
    kind = type(pipe).__name__
    if "prompt" in params and prompts is None:
        raise ValueError(f"--prompts is needed: {kind} is text-conditioned; pass a file with one prompt per line")
    if "prompt" not in params and prompts is not None:
        what = "class-conditional" if "class_labels" in params else "not text-conditioned"
        raise ValueError(f"--prompts does not apply: {kind} is {what} and takes no prompt; leave out --prompts")
    if args.guidance is not None and "guidance_scale" not in params:
        raise ValueError(f"--guidance does not apply: {kind} has no classifier-free guidance; leave out --guidance")
    if args.steps is not None and "num_inference_steps" not in params:
        raise ValueError(f"--steps does not apply: {kind} takes no num_inference_steps; leave out --steps")
    trained = (getattr(getattr(pipe, "scheduler", None), "config", None) or {}).get("num_train_timesteps")
    if args.steps is not None and trained is not None and args.steps > trained:
        raise ValueError(f"--steps {args.steps} is more than the {trained} timesteps {kind}'s scheduler was trained "
                         f"with; use --steps {trained} or fewer")
    calib_steps = getattr(args, "calib_steps", None)
    steps = sampler_steps(pipe, args.steps)
    if calib_steps is not None and steps is not None and calib_steps > steps:
        source = "--steps" if args.steps is not None else f"{kind}'s default"
        raise ValueError(f"--calib-steps {calib_steps} is more than the sampler's {steps} steps ({source}); use "
                         f"--calib-steps {steps} or fewer, or --steps {calib_steps} or more")


# -- quantize ------------------------------------------------------------------------------------------------------
def _packed_size_mib(model: torch.nn.Module) -> tuple[float, float]:
    """(FP32 size, size with weights at their quantized bit width) of a quantized denoiser, in MiB."""
    from .prepare import quant_layers

    fp = sum(p.numel() for n, p in model.named_parameters() if "_quantizer." not in n) * 4
    packed = fp
    for layer in quant_layers(model).values():
        packed -= layer.weight.numel() * (4 - layer.weight_quantizer.bits / 8)
    return fp / 2**20, packed / 2**20


def next_commands(args: argparse.Namespace, out: Path, model_name: str, zoo_model: bool) -> list[str]:
    """The exact commands that use what ``quantize`` wrote (same model and device)."""
    model = ["--model", args.model] if args.model is not None else []
    device = ["--device", args.device] if args.device is not None else []
    commands = [command_line("questdiff", "sample", *model, "--quantized", str(out), *device,
                             "--out", str(out / "samples")),
                command_line("questdiff", "convert", *model, "--quantized", str(out), *device,
                             "--out", str(out / "deployed"))]
    if zoo_model:  # `questdiff eval` measures zoo models against their dataset
        commands.append(command_line("questdiff", "eval", *(["--model", model_name] if args.model else []),
                                     "--quantized", str(out), *device, "--out", str(out / "eval")))
    return commands


def _kept_for_resume(out: Path) -> str:
    from .calibration.methods import progress_summary

    kept = (["calibration data"] if (out / "calibration.safetensors").is_file() else []) + progress_summary(out / "work")
    if not kept:
        return "nothing had finished yet, nothing was kept"
    return f"kept {' and '.join(kept)} in {out}; run the same command again to resume from there"


def cmd_quantize(args: argparse.Namespace) -> int:
    from .loading import resolve_device
    from .quantize_out import check_out

    start = time.perf_counter()
    config = _preset(args.preset, args.rotate, args.smooth)
    options = _method_options(args)
    prompts = _read_prompts(args.prompts)
    device = resolve_device(args.device)
    check_out(args.out, args.recollect)
    with output_dir(args.out) as out:
        try:
            return _quantize(args, config, options, prompts, device, out, start)
        except KeyboardInterrupt:
            raise Interrupted(_kept_for_resume(out)) from None


def _quantize(args: argparse.Namespace, config: Any, options: dict[str, Any], prompts: list[str] | None,
              device: torch.device, out: Path, start: float) -> int:
    from . import checkpoint, distributed, zoo
    from .api import quantize
    from .calibration import CalibrationSet, collect_calibration
    from .calibration.methods import finish_stages
    from .loading import load_pipeline
    from .pipelines import denoiser_of, fit_scheduler, sampler_steps, set_scheduler
    from .prepare import act_quantizers, handle, quant_layers
    from .quantize_out import check_reused_calibration, collection_settings

    pipe, name = load_pipeline(args.model, device)
    _check_pipeline_options(pipe, args, prompts)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    fit_scheduler(pipe, sampler_steps(pipe, args.steps))
    unet = denoiser_of(pipe)
    calib_path = out / "calibration.safetensors"
    settings = collection_settings(pipe, args, prompts)
    if distributed.on_main(lambda: calib_path.is_file() and not args.recollect):
        calib = CalibrationSet.load(calib_path)
        check_reused_calibration(calib, CalibrationSet.saved_settings(calib_path), settings, unet, calib_path, device)
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
            prompts=prompts,
        )
        distributed.on_main(lambda: calib.save(calib_path, settings))
    quantize(unet, config, calib, args.method, device=device, batch_size=args.batch_size, work_dir=out / "work",
             seed=args.seed, **options)
    distributed.on_main(lambda: checkpoint.save(unet, out))
    if not args.keep_stages:  # the stage files are model-sized each; a rerun loads the saved model instead
        distributed.on_main(lambda: finish_stages(out / "work", out / checkpoint.WEIGHTS_NAME))
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
    commands = next_commands(args, out, name, zoo_model=name in {e.name for e in zoo.list_models()})
    if distributed.is_main():
        atomic_write_text(out / "summary.json", json.dumps({**summary, "next": commands}, indent=2))
        print("questdiff quantize: done\n" + table(list(summary.items())) + "\nnext:\n" +
              "\n".join(f"  {c}" for c in commands))
    return 0


# -- sample --------------------------------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    from .eval.report import foreign_files
    from .loading import resolve_device

    prompts = _read_prompts(args.prompts)
    device = resolve_device(args.device)
    label = checkpoint_label(args.quantized) if args.quantized else "FP"
    foreign = foreign_files(Path(args.out) / "images")
    if foreign:  # the images folder is replaced by this run's: never delete what sample did not write
        raise ValueError(f"--out {args.out}: its images/ holds files that questdiff sample did not write "
                         f"({', '.join(foreign[:3])}); move them away or choose another --out")
    with output_dir(args.out) as out:
        return _sample(args, prompts, device, label, out)


def _sample(args: argparse.Namespace, prompts: list[str] | None, device: torch.device, label: str, out: Path) -> int:
    from .eval.report import save_grid, save_image_folder
    from .eval.sampling import generate
    from .loading import load_pipeline
    from .pipelines import denoiser_of, fit_scheduler, quiet, sampler_steps, set_denoiser, set_scheduler

    start = time.perf_counter()
    pipe, name = load_pipeline(args.model, device)
    _check_pipeline_options(pipe, args, prompts)
    if args.quantized:
        set_denoiser(pipe, load_quantized(args.quantized, denoiser_of(pipe)))
    else:
        print("questdiff sample: no --quantized given: sampling the full-precision (FP) model")
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    fit_scheduler(pipe, sampler_steps(pipe, args.steps))
    if args.quantized:
        _warn_uncalibrated_steps(pipe, sampler_steps(pipe, args.steps))
    quiet(pipe)
    images = generate(
        pipe, args.num_images, seed=args.seed, batch_size=args.batch_size, num_inference_steps=args.steps,
        guidance_scale=args.guidance, prompts=prompts, desc=f"sampling {label}",
    )
    replaced = save_image_folder(images, out / "images")
    grid = save_grid(images, out / "grid.png", nrow=min(8, args.num_images))
    summary = {
        "model": name,
        "weights": label if args.quantized else "FP (no --quantized given)",
        "scheduler": type(pipe.scheduler).__name__,
        "images": f"{len(images)} x {tuple(images.shape[1:])} in {out / 'images'}"
                  + (f" (replacing the {replaced} of an earlier run)" if replaced else ""),
        "seed": args.seed,
        "grid": str(grid),
        "wall time": f"{time.perf_counter() - start:.1f} s",
    }
    print("questdiff sample: done\n" + table(list(summary.items())))
    return 0


def _warn_uncalibrated_steps(pipe: Any, steps: int | None) -> None:
    """Warn, before sampling, if the scheduler's timesteps leave the quantized denoiser's calibration (deployed
    models read their rows on the device, so this is their only warning; fake-quant ones would warn at the step)."""
    from .pipelines import denoiser_of
    from .prepare import handle

    if steps is None:
        return
    h = handle(denoiser_of(pipe))
    pipe.scheduler.set_timesteps(steps)
    message = h.schedule.coverage_warning(pipe.scheduler.timesteps)
    if message:
        warnings.warn(message, stacklevel=2)
        h.state.coverage_warned = True  # once per denoiser


# -- parser --------------------------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="diffusers pipeline folder or zoo model name (default: the embedded zoo model)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--prompts", default=None, help="prompts file, only for text-to-image pipelines: one prompt per line, or "
                                                   "a TSV with a Prompt column (default: none)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images (calibration rows) per batch")


def _quantize_args(q: argparse.ArgumentParser) -> None:
    from .calibration.finetune import ORDERS
    from .calibration.methods import available_methods
    from .pipelines import SCHEDULERS

    _model_args(q)
    q.add_argument("--preset", default="W8A8",
                   help="W8A8, W4A8, W4A4 or any W<bits>A<bits>; W8A8-FP8: e4m3 weights and activations")
    q.add_argument("--method", default="rtn", choices=available_methods(), help="calibration method")
    q.add_argument("--rotate", type=positive_int, default=None, metavar="B",
                   help="rotate the input channels of every quantized layer by a randomized Hadamard matrix in blocks "
                        "of B (a power of two, e.g. 64; QuaRot-style): 4-bit activations become per tensor, a grid "
                        "the kernels run (default: no rotation)")
    q.add_argument("--smooth", type=alpha_or_off, default=None, metavar="ALPHA|off",
                   help="SmoothQuant: divide every quantized layer's input channels by a calibrated s and fold s into "
                        "the weight, with migration strength ALPHA in (0, 1]; 4-bit activations are then per tensor, a "
                        "grid the kernels run. 'off': no smoothing, so 4-bit activations take QuEST's per-input-channel "
                        "grid (simulated when deployed) (default: off)")
    q.add_argument("--calib-samples", type=positive_int, default=64, help="sampling trajectories for calibration data")
    q.add_argument("--calib-steps", type=positive_int, default=None,
                   help="calibrated timesteps, uniformly strided, at most the sampler's steps (default: every sampler step)")
    q.add_argument("--samples-per-step", type=positive_int, default=None, help="cap on calibration rows per timestep (default: no cap)")
    q.add_argument("--steps", type=positive_int, default=None, help="sampler steps for calibration (default: the pipeline's)")
    q.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help="sampler for calibration, as you will sample (default: the pipeline's; add --recollect when "
                        "OUT holds calibration data of another sampler)")
    q.add_argument("--guidance", type=finite_float, default=None, help="CFG scale for calibration (default: the pipeline's)")
    q.add_argument("--recollect", action="store_true",
                   help="sample calibration data again even if OUT has it; refused once stages were computed from it "
                        "(by default a rerun reuses OUT's calibration data, and refuses it if it was collected with "
                        "other --calib-samples, --calib-steps, --samples-per-step, --steps, --guidance, --seed or "
                        "--prompts)")
    q.add_argument("--recon-iters", type=non_negative_int, default=None, help="BRECQ/AdaRound iterations per block (default: 20000)")
    q.add_argument("--tla-epochs", type=non_negative_int, default=None, help="TLA epochs per timestep (default: 200)")
    q.add_argument("--cma-epochs", type=non_negative_int, default=None, help="CMA epochs over all timesteps (default: 20)")
    q.add_argument("--order", default=None, choices=ORDERS,
                   help="TLA/CMA batch order (default: 'shuffled', one timestep per step as in the paper; 'mixed' puts "
                        "every timestep in each step: the same rows and epochs in far fewer steps, for GPUs)")
    q.add_argument("--out", type=folder, default="runs/quantized",
                   help="output folder (checkpoint, calibration data, stage checkpoints); rerunning the same command "
                        "resumes a killed run there (finished stages, and finished BRECQ units) or reloads a finished "
                        "one; other settings, or a folder holding a deployed checkpoint, are refused")
    q.add_argument("--keep-stages", action="store_true",
                   help="keep the per-stage checkpoints in OUT/work once the final model is saved (default: they are "
                        "removed then, a record of the run's settings stays so that a rerun reloads the final model)")
    add_nproc_argument(q)
    q.set_defaults(func=cmd_quantize)


def _sample_args(s: argparse.ArgumentParser) -> None:
    from .pipelines import SCHEDULERS

    _model_args(s)
    s.add_argument("--quantized", default=None,
                   help="folder written by 'questdiff quantize' or 'questdiff convert' (default: none, the full-precision model "
                        "is sampled)")
    s.add_argument("--num-images", type=positive_int, default=16, help="images to sample")
    s.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the pipeline's)")
    s.add_argument("--guidance", type=finite_float, default=None, help="CFG scale (default: the pipeline's)")
    s.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="swap the sampler (default: the pipeline's)")
    s.add_argument("--out", type=folder, default="runs/samples",
                   help="output folder (grid.png, images/): a rerun replaces the grid and images of an earlier run there "
                        "(once the new ones are written), so images of two runs are never mixed")
    s.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    """The ``questdiff`` parser; each command's options are added when that command is parsed or its help shown."""
    import importlib

    parser = CommandParser(prog="questdiff", description="QuEST-style low-bit quantization of diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    sub.add_parser("quantize", help="quantize a pipeline's denoiser (data-free calibration from its own samples)",
                   add_arguments=_quantize_args)
    sub.add_parser("sample", help="sample images from the FP model, or a quantized one with --quantized",
                   add_arguments=_sample_args)
    for module in SUBCOMMAND_MODULES:  # a broken subpackage must fail here, not vanish from --help
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prog = " ".join(["questdiff", args.command] + ([args.zoo_command] if getattr(args, "zoo_command", None) else []))
    if getattr(args, "nproc", None) is None and "WORLD_SIZE" not in os.environ:
        return run_command(prog, args.func, args, verbose=args.verbose)
    from . import launch  # imports torch: only for multi-process runs

    if launch.requested(args):  # --nproc N: the same command on N ranks under torchrun
        return launch.run_torchrun(argv, args.nproc)
    with launch.rank_context(args):
        return run_command(prog + launch.rank_prefix(), args.func, args, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
