"""``questdiff zoo list|train|eval|export``: the zoo's command line.

``register(subparsers)`` adds the ``zoo`` command to the main parser; each subcommand sets ``args.func``, a callable
``(args) -> int`` (exit code). ``python -m questdiff.zoo.cli ...`` runs it stand-alone. The training code, the
evaluation metrics and diffusers' pipelines are imported only by the subcommand that runs them: ``zoo list`` reads
the registry alone.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..cli_common import CommandParser, folder, positive_int, run_command
from .registry import SPECS

DTYPES = ("float16", "bfloat16", "float32")


def _list(args: argparse.Namespace) -> int:
    from . import list_models

    rows = [("name", "kind", "mirrors", "params", "size", "sampler", "quality")]
    for e in list_models():
        sampler = "-"
        if e.sampler is not None:
            s = e.sampler
            sampler = f"{s.scheduler} {s.num_inference_steps} eta {s.eta}" + (
                f" cfg {s.guidance_scale}" if s.guidance_scale is not None else "")
        if e.fid is not None:
            quality = f"{e.fid_label} {e.fid:.2f}"
        elif "test_accuracy" in e.metrics:
            quality = f"test acc {e.metrics['test_accuracy']:.4f}"
        else:
            quality = "-"
        params = f"{e.params / 1e6:.2f}M" if e.shipped else "not shipped"
        size = f"{e.size_bytes / 1e6:.1f} MB" if e.shipped else "-"
        rows.append((e.name, e.kind, e.mirrors, params, size, sampler, quality))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _device(name: str | None) -> str:
    from ..loading import resolve_device

    return str(resolve_device(name))


def _train(args: argparse.Namespace) -> int:
    from .train import train

    budget = args.time_budget * 60 if args.time_budget is not None else None
    train(args.name, args.out, data_dir=args.data, device=_device(args.device), steps=args.steps,
          batch_size=args.batch_size, time_budget_s=budget, resume=args.resume, vae_dir=args.vae, tiny=args.tiny)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_folder

    metrics = evaluate_folder(args.name, args.model, data_dir=args.data, features_dir=args.features,
                              device=_device(args.device), num_samples=args.num_samples, batch_size=args.batch_size,
                              seed=args.seed, grid=args.grid)
    logging.getLogger(__name__).info("%s: %s", args.name, metrics)
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_model

    share = {}
    for item in args.share:
        component, sep, folder = item.partition("=")
        if not sep or not component or not folder:
            raise ValueError(f"--share takes COMPONENT=FOLDER (e.g. vae=weights/_shared/fmnist-vae), got {item!r}")
        share[component] = folder
    export_model(args.name, args.model, args.out, getattr(torch, args.dtype), share)
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train import TARGETS

    p.add_argument("name", choices=TARGETS, help="what to train")
    p.add_argument("--data", help="folder with the idx .gz files (default: $QUESTDIFF_DATA, then standard places)")
    p.add_argument("--out", type=folder, required=True, help="run folder: model/, checkpoints/, samples/")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--steps", type=positive_int, help="training steps of each stage (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, help="batch size of each stage (default: the recipe's)")
    p.add_argument("--time-budget", type=float,
                   help="wall-clock minutes per stage; the lr schedule anneals by it (default: no budget)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--vae", help="trained autoencoder folder (`zoo train fmnist-vae` output) for latent models "
                                 "(default: train one first)")
    p.add_argument("--tiny", action="store_true", help="minimal architectures, for tests and smoke runs")
    p.set_defaults(func=_train)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=list(SPECS), help="zoo model name")
    p.add_argument("--model", required=True, help="saved model folder (e.g. OUT/model)")
    p.add_argument("--features", help="feature-net folder (default: the shipped one of the model's dataset)")
    p.add_argument("--data", help="folder with the idx .gz files (default: $QUESTDIFF_DATA, then standard places)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--num-samples", type=positive_int, default=10000, help="samples to generate")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="sampling batch")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--grid", help="also write a 10x10 PNG grid of samples here (default: no grid)")
    p.set_defaults(func=_eval)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=list(SPECS), help="zoo model name")
    p.add_argument("--model", required=True, help="saved model folder (e.g. OUT/model)")
    p.add_argument("--out", type=folder, required=True, help="destination folder")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype of the floating weights")
    p.add_argument("--share", action="append", default=[], metavar="COMPONENT=FOLDER",
                   help="store this component once in FOLDER (moved there, or checked equal to what is there) and "
                        "reference it, e.g. vae=src/questdiff/zoo/weights/_shared/fmnist-vae (repeatable)")
    p.set_defaults(func=_export)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``zoo`` with the subcommands ``list``, ``train``, ``eval`` and ``export`` (their options are added
    when the subcommand is parsed, so ``zoo list`` does not import the training code)."""
    zoo = subparsers.add_parser("zoo", help="the reference zoo: list, train, evaluate and export its models")
    sub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="{list,train,eval,export}",
                             parser_class=CommandParser)
    sub.add_parser("list", help="zoo models with sizes, sampler defaults and measured quality").set_defaults(func=_list)
    sub.add_parser("train", help="train a zoo model (GPU recommended) into OUT/model", add_arguments=_train_args)
    sub.add_parser("eval", help="FID (own features) / accuracy of a saved zoo folder into its metrics.json",
                   add_arguments=_eval_args)
    sub.add_parser("export", help="copy a saved zoo folder with weights stored in another dtype",
                   add_arguments=_export_args)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m questdiff.zoo.cli zoo train ...`` (``zoo`` may be left out)."""
    parser = CommandParser(prog="questdiff")
    register(parser.add_subparsers(dest="command", required=True, parser_class=CommandParser))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "zoo":
        argv = ["zoo", *argv]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(f"questdiff zoo {args.zoo_command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
