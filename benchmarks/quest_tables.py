"""QuEST result tables on the project's zoo: models x presets (W8A8 / W4A8 / W4A4) x methods (FP, rtn, qdiffusion,
quest) and ablations (quest-tla, quest-cma, no global loss, one shared activation-scale set instead of one per
timestep), with the quality numbers of ``questdiff.eval``.

Quality per variant: "FID/sFID/IS (<dataset> features)" against the dataset's test images (zoo models only: they
name their feature network), and PSNR / SSIM / feature distance of the quantized samples against the FP samples of
the same seeds. Every variant also reports its stage times and peak memory. Stages shared by several variants
(weight init, BRECQ, activation init) run once per (model, preset) and are resumed from ``--work`` by the others,
and a re-run resumes everything that finished.

    python benchmarks/quest_tables.py --device cuda                                  # every shipped zoo model
    python benchmarks/quest_tables.py --zoo fmnist-ldm --presets W4A8 --methods FP qdiffusion quest
    python benchmarks/quest_tables.py --quick --model /path/to/pipeline_folder       # CPU smoke run
    python benchmarks/quest_tables.py --zoo fmnist-dit --cma-critical sensitivity    # CMA's layers by sensitivity
    python benchmarks/quest_tables.py --zoo fmnist-ldm --presets W4A4 --rotate 64    # rotated inputs: W4A4-rot64 rows

Writes ``quest_tables[-quick].json`` and ``.md`` to ``--out`` (default ``benchmarks/results``) and a grid of the first
samples of every row to ``OUT/grids/<model>-<preset>-<method>.png``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import questdiff as qd
from questdiff import pipelines, zoo
from questdiff.calibration import BrecqConfig, CMAConfig, TLAConfig
from questdiff.calibration.finetune import ORDERS
from questdiff.calibration.methods import share_stages
from questdiff.config import ActivationSpec, QuantConfig, preset
from questdiff.eval.report import save_grid
from questdiff.io_utils import atomic_write_text
from questdiff.loading import load_pipeline
from peer_fp8 import dynamic_fp8_rowwise  # benchmarks/ is on sys.path when run as a script

logger = logging.getLogger("quest_tables")

SHARED_UPTO = "act_init"  # weight_init, brecq, act_init: identical for qdiffusion and every quest variant
GRID_IMAGES = 40  # first samples of every row, same seeds (zoo conditional models: one class per column)


@dataclass(frozen=True)
class Variant:
    """One table row: a method with options, optionally on a modified quantization config."""

    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    peer: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # a peer's method instead (no calibration)

    @property
    def shares_base(self) -> bool:
        return self.method not in (None, "rtn")


VARIANTS: dict[str, Variant] = {
    "FP": Variant(None),
    "rtn": Variant("rtn"),
    "qdiffusion": Variant("qdiffusion"),
    "quest": Variant("quest"),
    "quest-tla": Variant("quest-tla"),
    "quest-cma": Variant("quest-cma"),
    "quest-no-global": Variant("quest", {"global_loss": False}),
    "quest-shared-scales": Variant("quest", config={"timestep_aware": False}),
    "torchao-fp8-row": Variant(None, peer=dynamic_fp8_rowwise),  # torchao's dynamic fp8 per row, fake-quant
}


def _cma_choice(args: argparse.Namespace) -> dict[str, Any]:
    """CMAConfig fields of ``--cma-critical`` (auto, sensitivity or comma-separated roles) and ``--cma-top-k``."""
    fields: dict[str, Any] = {}
    if args.cma_critical is not None:
        critical = args.cma_critical
        fields["critical"] = critical if critical in ("auto", "sensitivity") else tuple(r.strip() for r in critical.split(","))
    if args.cma_top_k is not None:
        fields["top_k"] = args.cma_top_k
    return fields


def _variant_dir(variant_name: str, args: argparse.Namespace) -> str:
    """Work folder of a variant: settings that change its stages get their own folder (no resume clash)."""
    suffix = f"-{args.order}" if args.order else ""
    if args.cma_critical is not None or args.cma_top_k is not None:
        suffix += f"-cma-{(args.cma_critical or 'auto').replace(',', '+')}{args.cma_top_k or ''}"
    return variant_name + suffix


def _stage_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    from questdiff.calibration.quest import METHOD_OPTIONS

    accepted = METHOD_OPTIONS.get(method, ())
    options: dict[str, Any] = {}
    if "brecq" in accepted and args.recon_iters is not None:
        options["brecq"] = BrecqConfig(iters=args.recon_iters)
    for stage, cls, epochs, batch in (("tla", TLAConfig, args.tla_epochs, args.tla_batch),
                                      ("cma", CMAConfig, args.cma_epochs, args.cma_batch)):
        fields = {k: v for k, v in (("epochs", epochs), ("batch_size", batch), ("order", args.order)) if v is not None}
        if stage == "cma":
            fields.update(_cma_choice(args))
        if stage in accepted and (fields or args.autocast):
            options[stage] = cls(autocast=args.autocast, **fields)
    return options


# -- sampling and metrics ----------------------------------------------------------------------------------------------
def sample(pipe: Any, n: int, seed: int, args: argparse.Namespace, desc: str) -> torch.Tensor:
    """``[n, 1, 32, 32]`` in [0, 1]: ``questdiff.eval.sampling.generate`` for zoo pipelines; other pipelines are
    called directly and their images turned grey and resized to the feature network's 32x32."""
    zoo_classes = tuple(getattr(zoo, "PIPELINE_CLASSES", {}).values())
    if zoo_classes and isinstance(pipe, zoo_classes):
        from questdiff.eval.sampling import generate

        return generate(pipe, n, seed=seed, batch_size=args.batch_size, num_inference_steps=args.steps, desc=desc)
    chunks = []
    for start in range(0, n, args.batch_size):
        count = min(args.batch_size, n - start)
        kwargs = pipelines.call_kwargs(pipe, start, count, seed, num_inference_steps=args.steps, output_type="np")
        chunks.append(pipelines.as_image_tensor(pipe(**kwargs).images))
    images = torch.cat(chunks).mean(dim=1, keepdim=True)
    return F.interpolate(images, size=32, mode="bilinear", align_corners=False).clamp(0, 1)


@dataclass
class Reference:
    """What the quantized samples are compared with."""

    fp_images: torch.Tensor
    feature_net: Any = None
    feature_name: str | None = None
    real: Any = None  # FeatureSet of the test images


def quality(images: torch.Tensor, ref: Reference, args: argparse.Namespace, is_fp: bool) -> dict[str, float]:
    """Generative metrics vs the test set (when a feature network is known) and fidelity vs the FP samples."""
    from questdiff.eval import (
        extract_features,
        fidelity_metrics,
        generative_metrics,
        psnr,
        ssim,
    )

    metrics: dict[str, float] = {}
    if ref.feature_net is not None:
        fake = extract_features(ref.feature_net, images, ref.feature_name, device=args.device)
        metrics.update(generative_metrics(fake, ref.real, seed=args.seed))
        if not is_fp:
            metrics.update(fidelity_metrics(images, ref.fp_images, ref.feature_net, ref.feature_name, device=args.device))
    elif not is_fp:
        metrics["PSNR (dB)"] = float(psnr(images, ref.fp_images).mean())
        metrics["SSIM"] = float(ssim(images, ref.fp_images).mean())
    return metrics


def reference_for(name: str | None, pipe: Any, args: argparse.Namespace) -> Reference:
    fp = sample(pipe, args.num_samples, args.seed, args, "FP samples")
    feature_name = args.feature_net
    dataset = None
    if name is not None and name in zoo.registry.SPECS:
        spec = zoo.registry.get_spec(name)
        feature_name, dataset = feature_name or spec.feature_net, spec.dataset
    if feature_name is None or not zoo.registry.is_shipped(feature_name):
        if feature_name is not None:
            logger.warning("feature network %s is not shipped: FID/sFID/IS skipped", feature_name)
        return Reference(fp)
    from questdiff.eval import extract_features
    from questdiff.zoo import data as zoo_data

    net = zoo.load_feature_net(feature_name, device=args.device)
    dataset = dataset or zoo.registry.get_spec(feature_name).dataset
    real, _ = zoo_data.load_split(dataset, "test", data_dir=args.data)
    real = zoo_data.to_unit_range(real[: args.num_reference])
    return Reference(fp, net, feature_name, extract_features(net, real, feature_name, device=args.device))


# -- quantization ------------------------------------------------------------------------------------------------------
def preset_label(preset_name: str, args: argparse.Namespace) -> str:
    """The rows' preset column and work folder: ``W4A4``, ``W4A4-smooth0.5`` with ``--smooth 0.5``, ``W4A4-rot64``
    with ``--rotate 64``, ``W4A4-tensor`` / ``W4A4-channel`` with ``--act-granularity``, ``W4A4-qkvp`` with
    ``--attention qkvp``."""
    smooth = f"-smooth{args.smooth:g}" if args.smooth else ""
    granularity = f"-{args.act_granularity}" if args.act_granularity else ""
    attention = f"-{args.attention}" if args.attention else ""
    return preset_name + smooth + (f"-rot{args.rotate}" if args.rotate else "") + granularity + attention


def variant_config(preset_name: str, variant: Variant, args: argparse.Namespace) -> QuantConfig:
    config = preset(preset_name).replace(**variant.config)
    changes: dict[str, Any] = {}
    if args.rotate:
        changes["rotation"] = args.rotate
    if args.smooth:
        changes["smoothing"] = args.smooth
    if args.act_granularity:
        changes["channelwise"] = args.act_granularity == "channel"
    if changes:
        config = config.replace(activation=dataclasses.replace(config.activation, **changes))
    if args.attention:
        config = config.replace(attention=args.attention)
    return config


def quantize_variant(fp_unet: torch.nn.Module, calib: qd.CalibrationSet, preset_name: str, variant_name: str,
                     variant: Variant, work: Path, args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict[str, Any]], dict[str, Any]]:
    """Quantize a copy of ``fp_unet``; variants sharing the first stages resume them from the base run."""
    config = variant_config(preset_name, variant, args)
    key = "shared-scales" if variant.config.get("timestep_aware") is False else "per-t"
    preset_name = preset_label(preset_name, args)  # rotated runs keep their own stage folders
    base = work / preset_name / key / "base"
    assert variant.method is not None
    shared_run: dict[str, dict[str, Any]] = {}
    if variant.shares_base and variant.method != "qdiffusion":
        target = work / preset_name / key / _variant_dir(variant_name, args)
        if not share_stages(base, target, "qdiffusion", SHARED_UPTO):
            logger.info("%s %s: running the shared stages", preset_name, key)
            base_unet = qd.quantize(copy.deepcopy(fp_unet), config, calib, "qdiffusion", device=args.device,
                                    batch_size=args.batch_size, work_dir=base, seed=args.seed, progress=not args.quiet,
                                    **_stage_options(args, "qdiffusion"))
            shared_run = {s["stage"]: s for s in qd.handle(base_unet).extra.get("report", []) if not s.get("resumed")}
            share_stages(base, target, "qdiffusion", SHARED_UPTO)
    else:
        target = base if variant.method == "qdiffusion" else work / preset_name / key / variant_name
    options = {**_stage_options(args, variant.method), **variant.options}
    unet = qd.quantize(copy.deepcopy(fp_unet), config, calib, variant.method, device=args.device, batch_size=args.batch_size,
                       work_dir=target, seed=args.seed, progress=not args.quiet, **options)
    h = qd.handle(unet)
    # shared stages run for this variant's sake count in its cost (the base run measured them), not as "resumed"
    report = [shared_run.get(s["stage"], s) if s.get("resumed") else s for s in h.extra.get("report", [])]
    return unet, report, h.extra.get("calibration", {})


def run_model(name: str | None, folder: str | None, args: argparse.Namespace,
              flush: Any = lambda rows: None) -> list[dict[str, Any]]:
    pipe, label = (zoo.load(name, device=args.device), name) if name else load_pipeline(folder, args.device)
    pipelines.quiet(pipe)
    fp_unet = pipelines.denoiser_of(pipe)
    calib = qd.collect_calibration(pipe, num_samples=args.calib_samples, calib_steps=args.calib_steps,
                                   num_inference_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                   progress=not args.quiet)
    ref = reference_for(name, pipe, args)
    rows = []
    work = Path(args.work) / str(label)
    for preset_name in args.presets:
        for variant_name in args.methods:
            variant = VARIANTS[variant_name]
            if variant.method is None and preset_name != args.presets[0]:
                continue  # FP and the peers once per model
            start = time.perf_counter()
            report: list[dict[str, Any]] = []
            losses: dict[str, Any] = {}
            if variant.peer is not None:
                pipelines.set_denoiser(pipe, variant.peer(fp_unet))
                images = sample(pipe, args.num_samples, args.seed, args, variant_name)
                pipelines.set_denoiser(pipe, fp_unet)
            elif variant.method is None:
                images = ref.fp_images
            else:
                unet, report, losses = quantize_variant(fp_unet, calib, preset_name, variant_name, variant, work, args)
                pipelines.set_denoiser(pipe, unet)
                images = sample(pipe, args.num_samples, args.seed, args, f"{preset_name} {variant_name}")
                pipelines.set_denoiser(pipe, fp_unet)
            row_preset = "peer" if variant.peer else "FP" if variant.method is None else preset_label(preset_name, args)
            save_grid(images[:GRID_IMAGES], Path(args.out) / "grids" / f"{label}-{row_preset}-{variant_name}.png", nrow=10)
            row = {"model": label, "preset": row_preset, "method": variant_name,
                   "metrics": quality(images, ref, args, variant.method is None and variant.peer is None),
                   "stages": report,
                   "calibration": losses, "seconds": round(time.perf_counter() - start, 2)}
            logger.info("%s %s %s: %s", label, row["preset"], variant_name, row["metrics"])
            rows.append(row)
            flush(rows)  # results so far survive a run cut short
    return rows


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["metrics"] if k not in keys and "std" not in k]
    head = "| model | preset | method | " + " | ".join(keys) + " | stage seconds (peak MiB) |"
    lines = ["# QuEST tables", "", f"Settings: `{json.dumps(settings)}`", "", head, "|" + "---|" * (len(keys) + 4)]
    for row in rows:
        cells = [f"{row['metrics'][k]:.4g}" if k in row["metrics"] else "-" for k in keys]
        stages = ", ".join(
            f"{s['stage']} {'resumed' if s.get('resumed') else s['seconds']}"
            + (f" ({s['peak_memory_mib']:.0f})" if s.get("peak_memory_mib") else "")
            for s in row["stages"]
        )
        lines.append(f"| {row['model']} | {row['preset']} | {row['method']} | " + " | ".join(cells) + f" | {stages or '-'} |")
    lines += ["", "FID-type numbers use the project's feature networks, not Inception-v3: compare them only with each other.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", nargs="*", default=None, help="zoo model names (default: every shipped diffusion model)")
    p.add_argument("--model", action="append", default=[], help="a diffusers pipeline folder (repeatable)")
    p.add_argument("--presets", nargs="+", default=["W8A8", "W4A8", "W4A4"])
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast in TLA/CMA (CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a CPU smoke run")
    p.add_argument("--num-samples", type=int, default=None, help="images per variant (default 2048; quick 16)")
    p.add_argument("--num-reference", type=int, default=10000, help="test images for FID")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration trajectories (default 256; quick 2)")
    p.add_argument("--calib-steps", type=int, default=None, help="calibrated timesteps (default 20; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the pipeline's; quick 4)")
    p.add_argument("--recon-iters", type=int, default=None, help="BRECQ iterations per unit (default 20000; quick 2)")
    p.add_argument("--tla-epochs", type=int, default=None, help="TLA epochs (default 200; quick 1)")
    p.add_argument("--cma-epochs", type=int, default=None, help="CMA epochs (default 20; quick 1)")
    p.add_argument("--tla-batch", type=int, default=None, help="TLA rows per step (default 2, the code's micro-batch)")
    p.add_argument("--cma-batch", type=int, default=None, help="CMA rows per step (default 4, the code's micro-batch)")
    p.add_argument("--order", default=None, choices=ORDERS,
                   help="TLA/CMA batch order (default: the configs' 'shuffled'; 'mixed' batches all timesteps together)")
    p.add_argument("--cma-critical", default=None,
                   help="CMA's trained layers: 'auto' (the code's per-family roles), 'sensitivity' (the --cma-top-k "
                        "layers most sensitive to low-bit inputs) or comma-separated roles, e.g. 'ff,attn.self.q'")
    p.add_argument("--cma-top-k", type=int, default=None, help="layers CMA trains with --cma-critical sensitivity (default 8)")
    p.add_argument("--rotate", type=int, default=None, metavar="B",
                   help="rotate every quantized layer's input channels in Hadamard blocks of B (a power of two; "
                        "ActivationSpec.rotation); rows read e.g. W4A4-rot64 (default: no rotation)")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant-smooth every quantized layer's input with migration strength ALPHA in (0, 1] "
                        "(ActivationSpec.smoothing); rows read e.g. W4A4-smooth0.5 (default: no smoothing)")
    p.add_argument("--act-granularity", default=None, choices=["tensor", "channel"],
                   help="activation grids per tensor or per input channel (default: the preset's rule, per channel at "
                        "4 bits unless --rotate); rows read e.g. W4A4-tensor")
    p.add_argument("--attention", default=None, choices=["qk", "qkvp"],
                   help="attention format (default: the preset's, 'qk'); rows read e.g. W4A4-qkvp")
    p.add_argument("--feature-net", default=None, help="zoo feature network for --model folders (e.g. mnist-features)")
    p.add_argument("--data", default=None, help="dataset folder for the test images (default: questdiff.zoo.data lookup)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--work", default=None, help="stage checkpoints (default: OUT/quest_tables_work)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.rotate is not None:
        try:
            ActivationSpec(rotation=args.rotate)
        except ValueError as err:
            p.error(f"--rotate {args.rotate}: {err}")
    if args.smooth is not None:
        try:
            ActivationSpec(smoothing=args.smooth)
        except ValueError as err:
            p.error(f"--smooth {args.smooth}: {err}")
    quick = {"num_samples": 16, "calib_samples": 2, "calib_steps": 2, "steps": 4, "recon_iters": 2, "tla_epochs": 1, "cma_epochs": 1}
    full = {"num_samples": 2048, "calib_samples": 256, "calib_steps": 20}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.work is None:
        args.work = str(Path(args.out) / ("quest_tables_work-quick" if args.quick else "quest_tables_work"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = args.zoo if args.zoo is not None else ([] if args.model else
             [e.name for e in zoo.list_models() if e.shipped and e.kind != zoo.registry.FEATURES])
    if not names and not args.model:
        print("quest_tables: no zoo model is shipped yet; pass --model PIPELINE_FOLDER (or --zoo NAME)", file=sys.stderr)
        return 2
    settings = {k: getattr(args, k) for k in ("presets", "num_samples", "calib_samples", "calib_steps", "steps",
                                              "recon_iters", "tla_epochs", "cma_epochs", "tla_batch", "cma_batch", "order", "seed", "device",
                                              "autocast", "cma_critical", "cma_top_k", "rotate", "smooth", "act_granularity", "attention")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quest_tables-quick" if args.quick else "quest_tables"
    done: list[dict[str, Any]] = []

    def flush(model_rows: list[dict[str, Any]]) -> None:
        rows = done + model_rows
        atomic_write_text(out / f"{stem}.json", json.dumps({"settings": settings, "rows": rows}, indent=2, default=str))
        atomic_write_text(out / f"{stem}.md", markdown(rows, settings))

    for name in names:
        done += run_model(name, None, args, flush)
    for folder in args.model:
        done += run_model(None, folder, args, flush)
    print(markdown(done, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
