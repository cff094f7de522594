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

from .cli_common import (
    check_out_kind,
    checkpoint_label,
    command_line,
    folder,
    load_quantized,
    quantized_metadata,
    table,
)
from .folders import checkpoint_kinds
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
                        help="output folder of the deployed checkpoint, a folder of its own: an earlier conversion of the "
                             "same model there is replaced; a fake-quant checkpoint (QUANTIZED itself) or another "
                             "model's deployed one is refused (default: QUANTIZED/deployed)")
    parser.set_defaults(func=run)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to an ``argparse`` subparsers object."""
    return subparsers.add_parser("convert", help="pack a quantized model into a deployed one (real low-bit kernels)",
                                 add_arguments=add_arguments)


SAME_MODEL_KEYS = ("base_fingerprint", "quant_config", "schedule", "method")  # what tells two quantized models apart


def _check_out(out: Path, source: dict[str, Any]) -> None:
    """The deployed checkpoint gets a folder of its own: not a fake-quant folder (``--quantized`` itself included),
    and not over the deployed checkpoint of another model; an earlier conversion of the same model is replaced."""
    from .deploy.checkpoint import read_deployed_metadata

    check_out_kind(out, "deployed")
    if "deployed" not in checkpoint_kinds(out):
        return
    try:
        existing = read_deployed_metadata(out, verify=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"--out {out}: holds an unreadable deployed checkpoint ({err}); delete it or choose another "
                         "--out") from None
    if any(existing.get(key) != source.get(key) for key in SAME_MODEL_KEYS):
        name = (existing.get("quant_config") or {}).get("name") or "quantized"
        raise ValueError(f"--out {out}: holds the deployed checkpoint of another model ({name} {existing.get('method')} "
                         f"of base {existing.get('base_fingerprint')}); choose another --out, or delete {out} to "
                         "replace it")


def run(args: argparse.Namespace) -> int:
    from .loading import load_pipeline, resolve_device

    start = time.perf_counter()
    source, deployed = quantized_metadata(args.quantized)  # a wrong folder fails before any model loads
    label = checkpoint_label(args.quantized)
    if deployed:
        raise ValueError(f"--quantized {args.quantized} is already a deployed checkpoint; pass the folder written by "
                         "'questdiff quantize'")
    out_path = Path(args.out) if args.out is not None else Path(args.quantized) / "deployed"
    _check_out(out_path, source)
    device = resolve_device(args.device)
    with output_dir(out_path) as out:
        from .deploy import convert, deployment, save_deployed
        from .pipelines import denoiser_of

        pipe, name = load_pipeline(args.model, device)
        model = load_quantized(args.quantized, denoiser_of(pipe))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            convert(model, backend=args.backend)
        for warning in caught:
            print(f"questdiff convert: warning: {warning.message}")
        save_deployed(model, out)
        summary = {
            "model": name,
            "weights": label,
            "deployed layers": deployment(model).describe(),
            "backend": args.backend,
            "file size": f"{_mib(Path(args.quantized)):.2f} MiB fake-quant -> {_mib(out):.2f} MiB deployed",
            "output": str(out),
            "wall time": f"{time.perf_counter() - start:.1f} s",
        }
    model_args = ["--model", args.model] if args.model is not None else []
    device_args = ["--device", args.device] if args.device is not None else []
    print("questdiff convert: done\n" + table(list(summary.items())) + "\nnext:\n  " +
          command_line("questdiff", "sample", *model_args, "--quantized", str(out), *device_args,
                       "--out", str(out / "samples")))
    return 0
