"""``questdiff eval``: sample a zoo model (and its quantized version from the same seeds) and write its metrics.

Outputs in ``--out``: ``metrics.json``, ``grid.png`` (FP samples), and with ``--quantized`` also
``grid_quantized.png`` and ``side_by_side.png`` (FP row over quantized row, one column per seed).
Run as ``questdiff eval ...`` or ``python -m questdiff.eval.cli ...``. The metrics (torchmetrics, scipy) are
imported when the command runs, not when the command line starts.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import zoo
from ..cli_common import (
    add_nproc_argument,
    CommandParser,
    checkpoint_label,
    finite_float,
    folder,
    load_quantized,
    positive_int,
    run_command,
)
from ..io_utils import output_dir

if TYPE_CHECKING:
    import torch

    from .features import FeatureSet

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Sample a zoo model (and its quantized version from the same seeds); write FID/sFID/IS/KID on the feature "
    "network, PSNR/SSIM/feature distance of quantized vs FP samples and class accuracy to OUT/metrics.json, with "
    "OUT/grid.png, OUT/grid_quantized.png and OUT/side_by_side.png (FP row over quantized row)."
)
GRID_IMAGES = 100
SIDE_BY_SIDE_IMAGES = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` options (shared by ``questdiff eval`` and ``python -m questdiff.eval.cli``)."""
    parser.add_argument("--model", default=zoo.DEFAULT_MODEL, help="zoo model name (default: %(default)s)")
    parser.add_argument("--quantized", metavar="DIR",
                        help="quantized checkpoint of --model saved by questdiff.save (default: evaluate the FP model only)")
    parser.add_argument("--num-samples", type=positive_int, default=1000,
                        help="samples per model; fewer than 500 give IS/KID that mean nothing, and a warning (FID wants "
                             "2048 or more) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's paper setting)")
    parser.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--eta", type=finite_float, help="DDIM eta (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="sampling batch (default: %(default)s)")
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--data", metavar="DIR",
                        help="folder with the dataset's idx .gz files (reference test set) (default: $QUESTDIFF_DATA, "
                             "then standard places)")
    parser.add_argument(
        "--num-reference", type=positive_int, help="use the first N test images as the reference set (default: all 10k)"
    )
    parser.add_argument(
        "--inception-weights", metavar="FILE",
        help="local pt_inception-2015-12-05-*.pth: also report Inception-v3 FID (default: not reported)"
    )
    parser.add_argument("--out", type=folder, default="runs/eval", help="output folder (default: %(default)s)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object; ``args.func`` is ``run``."""
    parser = subparsers.add_parser(
        "eval", help="FID/sFID/IS/KID, PSNR/SSIM vs FP and class accuracy of a zoo model", description=DESCRIPTION
    )
    add_arguments(parser)
    add_nproc_argument(parser)
    parser.set_defaults(func=run)
    return parser


def _model_metrics(
    feats: FeatureSet, reference: FeatureSet, labels: torch.Tensor | None, seed: int, device: str
) -> dict[str, Any]:
    from .accuracy import class_accuracy
    from .generative import generative_metrics

    metrics: dict[str, Any] = generative_metrics(feats, reference, seed=seed, device=device)
    if labels is not None:
        metrics.update(class_accuracy(feats, labels))
    return metrics


def _summary(metrics: dict[str, Any]) -> str:
    """Table of the scalar metrics: one row per metric, one column per model."""
    columns = [name for name in ("fp", "quantized") if name in metrics]
    rows: dict[str, dict[str, Any]] = {}
    for column in columns:
        for key, value in metrics[column].items():
            if isinstance(value, float):
                rows.setdefault(key, {})[column] = value
    for key, value in metrics.get("quantized_vs_fp", {}).items():
        rows.setdefault(f"{key}, quantized vs FP", {})["quantized"] = value
    width = max(len(key) for key in rows)
    lines = [f"{'metric':<{width}}" + "".join(f"{c:>14}" for c in columns)]
    for key, values in rows.items():
        cells = "".join(f"{values[c]:>14.5g}" if c in values else f"{'':>14}" for c in columns)
        lines.append(f"{key:<{width}}{cells}")
    return "\n".join(lines)


def _check_args(args: argparse.Namespace) -> str:
    """Refuse bad options before any work; returns the device to run on."""
    from ..loading import resolve_device
    from ..zoo.registry import FEATURES, get_spec
    from .generative import IS_SPLITS, small_sample_warning

    if args.num_samples < IS_SPLITS:
        raise ValueError(f"--num-samples must be >= {IS_SPLITS} (IS uses {IS_SPLITS} splits), got {args.num_samples}")
    if args.num_reference is not None and args.num_reference < 2:
        raise ValueError(f"--num-reference must be >= 2 (FID needs a covariance), got {args.num_reference}")
    try:
        kind = get_spec(args.model).kind
    except ValueError as err:
        raise ValueError(f"--model: {err}") from None
    if kind == FEATURES:
        raise ValueError(f"--model {args.model!r} is a feature network; pass a diffusion model of the zoo")
    for option, path in (("--data", args.data), ("--inception-weights", args.inception_weights)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{option} {path}: no such {'folder' if option == '--data' else 'file'}")
    if args.quantized:
        checkpoint_label(args.quantized)  # a wrong folder fails now, not after sampling the FP model
    device = str(resolve_device(args.device))
    caveat = small_sample_warning(args.num_samples)
    if caveat is not None:  # before the sampling, so the run can be stopped and restarted with more
        print(f"questdiff eval: warning: --num-samples {args.num_samples}: {caveat}", file=sys.stderr)
    return device


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``args.model`` (and ``args.quantized``); write the outputs to ``args.out``; return the metrics."""
    start_time = time.perf_counter()
    device = _check_args(args)
    with output_dir(args.out) as out:
        return _evaluate(args, device, out, start_time)


def _evaluate(args: argparse.Namespace, device: str, out: Path, start_time: float) -> dict[str, Any]:
    from ..pipelines import denoiser_of, fit_scheduler, quiet, sampler_steps, set_denoiser
    from ..zoo import data as zoo_data
    from ..zoo.registry import get_spec
    from .features import extract_features
    from .fidelity import fidelity_metrics
    from .generative import small_sample_warning
    from .report import save_grid, save_side_by_side, write_metrics_json
    from .sampling import class_labels, generate
    from .standard import INCEPTION_LABEL, InceptionPool3, inception_fid

    spec = get_spec(args.model)
    pipe = zoo.load(args.model, device=device)
    fit_scheduler(pipe, sampler_steps(pipe, args.steps))
    quiet(pipe)
    feature_name = spec.feature_net
    net = zoo.load_feature_net(feature_name, device=device)
    real, _ = zoo_data.load_split(spec.dataset, "test", data_dir=args.data)
    real = zoo_data.to_unit_range(real[: args.num_reference])
    logger.info("reference: %d %s test images; features from %s", len(real), spec.dataset, feature_name)
    reference = extract_features(net, real, feature_name, device=device)
    labels = class_labels(pipe, args.num_samples)
    sample = dict(
        num_images=args.num_samples, seed=args.seed, batch_size=args.batch_size,
        num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
    )
    inception = InceptionPool3(args.inception_weights) if args.inception_weights else None
    quantized = None
    if args.quantized:  # loaded before sampling so that a bad checkpoint fails fast
        # the core's loader restores in place: give it a copy of the FP one
        quantized = load_quantized(args.quantized, base=copy.deepcopy(denoiser_of(pipe)))
    images = {"fp": generate(pipe, desc="FP samples", **sample)}
    if quantized is not None:
        set_denoiser(pipe, quantized)
        images["quantized"] = generate(pipe, desc="quantized samples", **sample)
    from .. import distributed

    if not distributed.is_main():  # every rank sampled its share; rank 0 has all images and does the rest
        return {}

    metrics: dict[str, Any] = {
        "model": args.model,
        "quantized_checkpoint": args.quantized,
        "feature_net": feature_name,
        "num_samples": args.num_samples,
        "num_reference": len(real),
        "seed": args.seed,
        "steps": args.steps if args.steps is not None else pipe.config.get("default_num_inference_steps"),
        "guidance": args.guidance if args.guidance is not None else pipe.config.get("default_guidance_scale"),
        "eta": args.eta if args.eta is not None else pipe.config.get("default_eta"),
        "device": device,
    }
    caveat = small_sample_warning(args.num_samples)
    if caveat is not None:
        metrics["warnings"] = [caveat]
    for name, imgs in images.items():
        feats = extract_features(net, imgs, feature_name, device=device)
        metrics[name] = _model_metrics(feats, reference, labels, args.seed, device)
    if inception is not None:
        logger.info("Inception-v3 FID: %d reference images at 299x299", len(real))
        for name, score in inception_fid(images, real, inception, args.batch_size, device).items():
            metrics[name][INCEPTION_LABEL] = score
    if "quantized" in images:
        metrics["quantized_vs_fp"] = fidelity_metrics(
            images["quantized"], images["fp"], net, feature_name, device=device
        )
        save_grid(images["quantized"][:GRID_IMAGES], out / "grid_quantized.png", nrow=10)
        save_side_by_side(
            images["fp"][:SIDE_BY_SIDE_IMAGES], images["quantized"][:SIDE_BY_SIDE_IMAGES], out / "side_by_side.png"
        )
    save_grid(images["fp"][:GRID_IMAGES], out / "grid.png", nrow=10)
    metrics["time_s"] = round(time.perf_counter() - start_time, 2)
    write_metrics_json(out / "metrics.json", metrics)
    print(_summary(metrics))
    logger.info("wrote %s", out)
    return metrics


def run(args: argparse.Namespace) -> int:
    """``evaluate(args)``; returns the exit status 0 (errors propagate)."""
    evaluate(args)
    return 0


def main_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m questdiff.eval.cli`` (same options as ``questdiff eval``)."""
    return CommandParser(prog="questdiff eval", description=DESCRIPTION, add_arguments=add_arguments)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m questdiff.eval.cli``; returns the exit status (2 with a one-line error)."""
    args = main_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command("questdiff eval", run, args)


if __name__ == "__main__":
    raise SystemExit(main())
