"""``questdiff convert``: a fake-quant checkpoint (from ``questdiff quantize``) -> a deployed one (integer weight
codes and static per-timestep activation tables that run the low-bit kernels; loads without the FP base model).

Light at import (``questdiff --help`` must not import torch): the work is imported inside ``run``.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

from .cli_common import checkpoint_label, folder, load_quantized, table
from .io_utils import output_dir

BACKENDS = ("auto", "triton", "reference")


def _mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantized", required=True, help="folder written by 'questdiff quantize' (fake-quant checkpoint)")
    parser.add_argument("--model", default=None,
                        help="the pipeline it was quantized from: a diffusers folder or zoo name (default: the embedded "
                             "zoo model)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="kernels: 'auto' = Triton on CUDA, the pure-torch reference elsewhere; 'reference' always "
                             "the reference; 'triton' requires a GPU")
    parser.add_argument("--device", default=None, help="where to convert (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=folder, default=None,
                        help="output folder of the deployed checkpoint (default: QUANTIZED/deployed)")
    parser.set_defaults(func=run)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to an ``argparse`` subparsers object."""
    return subparsers.add_parser("convert", help="pack a quantized model into a deployed one (real low-bit kernels)",
                                 add_arguments=add_arguments)


def run(args: argparse.Namespace) -> int:
    from .loading import load_pipeline, resolve_device

    start = time.perf_counter()
    label = checkpoint_label(args.quantized)  # a wrong folder fails before any model loads
    if label.endswith(" deployed"):
        raise ValueError(f"--quantized {args.quantized} is already a deployed checkpoint; pass the folder written by "
                         "'questdiff quantize'")
    device = resolve_device(args.device)
    with output_dir(args.out or Path(args.quantized) / "deployed") as out:
        from .deploy import DeployedLayer, convert, save_deployed
        from .deploy.attention import DeployedOperands
        from .pipelines import denoiser_of

        pipe, name = load_pipeline(args.model, device)
        model = load_quantized(args.quantized, denoiser_of(pipe))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            convert(model, backend=args.backend)
        for warning in caught:
            print(f"questdiff convert: warning: {warning.message}")
        save_deployed(model, out)
        layers = [m for m in model.modules() if isinstance(m, DeployedLayer)]
        attention = [m for m in model.modules() if isinstance(m, DeployedOperands)]  # processors and SDPA sites
        fast = sum(m.runs_kernels for m in layers) + sum(p.runs_kernels for p in attention)
        summary = {
            "model": name,
            "weights": label,
            "deployed layers": f"{len(layers)} + {len(attention)} attention ({fast} on kernels, "
                               f"{len(layers) + len(attention) - fast} simulated)",
            "backend": args.backend,
            "file size": f"{_mib(Path(args.quantized)):.2f} MiB fake-quant -> {_mib(out):.2f} MiB deployed",
            "output": str(out),
            "wall time": f"{time.perf_counter() - start:.1f} s",
        }
    model_arg = f" --model {args.model}" if args.model else ""
    print("questdiff convert: done\n" + table(list(summary.items())) +
          f"\nnext:\n  questdiff sample{model_arg} --quantized {out} --out {out / 'samples'}")
    return 0
