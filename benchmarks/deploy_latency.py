"""Deployed-model speed and size on the GPU, side by side in one process.

1. ``--arch sd15``: an SD-1.5-architecture UNet2DConditionModel (random weights, 64x64 latent, 77x768 context) at
   each ``--batches`` size: bf16 eager / torch.compile against questdiff W8A8 (and ``--w4``: W4A8) deployed, eager
   and compiled. Latency (median of CUDA-event timed forwards), weight MiB, peak memory; with ``--profile`` a
   per-layer-kind breakdown (conv / linear / attention / activation quantization / other) of the eager forward at
   the largest batch, against the FLOPs of each kind.
2. ``--zoo NAME``: a zoo pipeline's sampling, FP vs fake-quant vs deployed (images/s at ``--zoo-batch``), the
   deployed samples' PSNR against the fake-quant samples of the same seeds, and its floor: each model against itself
   with its outputs perturbed at float-rounding size (``--floor-eps``). Runs on the CPU too (``--no-sd15 --device
   cpu``; the reference kernels).

    python benchmarks/deploy_latency.py --out benchmarks/results/deploy_latency-h200.json   # GPU machine

Quantizer values do not change the speed: the SD-1.5 model gets min-max weight grids and constant activation
scales; the zoo model is quantized for real (RTN, or ``--quantized DIR``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

import questdiff as qd
from architectures import build_sd15  # benchmarks/ is on sys.path when run as a script
from questdiff.calibration.common import output_tensor
from questdiff.calibration.weights import init_weights
from questdiff.config import WeightSpec, preset
from questdiff.deploy import convert
from questdiff.prepare import act_quantizers, prepare
from questdiff.timestep import TimestepSchedule

CONTEXT = (77, 768)


def _sync_time(fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (CUDA events, after warm-up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """One denoiser call captured in a CUDA graph (``replay`` runs it with no CPU launch cost). The timestep hook
    reads the timestep on the host, which a capture forbids: the row is fixed beforehand and the hook taken off
    (benchmark only: the replay serves that one timestep)."""
    h = getattr(model, "_questdiff", None)
    with torch.no_grad():
        model(**inputs)  # autotunes the kernels and sets the row
        if h is not None:
            h.hook.remove()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(**inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**inputs)
    if h is not None:
        h.hook = _reinstall(model)
    return graph.replay


def _reinstall(model: nn.Module) -> Any:
    from questdiff.prepare import HANDLE_ATTR
    from questdiff.timestep import install_timestep_hook

    h = getattr(model, HANDLE_ATTR)
    return install_timestep_hook(model, h.adapter.timestep_argument, HANDLE_ATTR)


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def quantized_sd15(label: str, rows: int = 20) -> nn.Module:
    """SD-1.5 UNet, fake-quantized at ``label`` with min-max weight grids and constant activation scales, deployed."""
    config = preset(label)
    config = config.replace(weight=WeightSpec(bits=config.weight.bits, scale_method="minmax"))
    with torch.device("cuda"):
        unet = build_sd15()
    schedule = TimestepSchedule.from_timesteps(torch.linspace(981, 1, rows).round())
    prepare(unet, config, schedule)
    init_weights(unet)
    with torch.no_grad():
        for q in act_quantizers(unet).values():
            q.scale.fill_(0.02)
            q.zero_point.fill_(0 if q.symmetric or q.always_zero else (q.qmax + 1) // 2)
    convert(unet)
    return unet.to(torch.bfloat16).eval()


def sd15_inputs(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {"sample": torch.randn(batch, 4, 64, 64, device="cuda", dtype=torch.bfloat16, generator=g),
            "timestep": torch.tensor(500, device="cuda"),
            "encoder_hidden_states": torch.randn(batch, *CONTEXT, device="cuda", dtype=torch.bfloat16, generator=g)}


def profile_kinds(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Device milliseconds of one eager forward by layer kind (torch.profiler, top-level ops)."""
    from torch.profiler import ProfilerActivity, profile

    kinds = {"questdiff::conv2d": "conv", "aten::cudnn_convolution": "conv", "questdiff::gemm": "linear",
             "aten::addmm": "linear", "aten::mm": "linear", "aten::bmm": "linear",
             "questdiff::attention": "attention", "aten::_scaled_dot_product_flash_attention": "attention",
             "aten::_scaled_dot_product_efficient_attention": "attention",
             "aten::_scaled_dot_product_cudnn_attention": "attention", "questdiff::quantize_codes": "act quantize"}
    with torch.no_grad():
        model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model(**inputs)
            torch.cuda.synchronize()
    out: dict[str, float] = {}
    total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    for event in prof.key_averages():
        kind = kinds.get(event.key)
        if kind is not None:
            out[kind] = out.get(kind, 0.0) + event.device_time_total / 1e3
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


def run_sd15(args: argparse.Namespace, save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    labels = ["bf16", "W8A8"] + (["W4A8"] if args.w4 else [])
    for label in labels:
        if label == "bf16":
            with torch.device("cuda"):
                model = build_sd15().to(torch.bfloat16).eval()
        else:
            model = quantized_sd15(label)
        weight_mib = _bytes(model) / 2**20
        modes = ["eager"] * args.eager + ["cuda-graph"] * args.cuda_graph + ["compile"] * args.compile
        for mode in modes:
            run = torch.compile(model) if mode == "compile" else model
            for batch in args.compile_batches if mode == "compile" and args.compile_batches else args.batches:
                inputs = sd15_inputs(batch)
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                try:
                    with torch.no_grad():
                        call = graphed(run, inputs) if mode == "cuda-graph" else (lambda: run(**inputs))
                        call()
                        torch.cuda.synchronize()
                        first = time.perf_counter() - start
                        ms = _sync_time(call, args.reps)
                except Exception as err:  # noqa: BLE001 - record the failure, time the rest
                    rows.append({"model": label, "mode": mode, "batch": batch, "error": repr(err)})
                    print(f"sd15 {label} {mode} batch {batch}: FAILED {err!r}", flush=True)
                    continue
                row = {"model": label, "mode": mode, "batch": batch, "ms": ms, "weight_mib": weight_mib,
                       "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "first_call_s": first}
                rows.append(row)
                save(rows)
                print(f"sd15 {label:5s} {mode:10s} batch {batch}: {ms:7.2f} ms  weights {weight_mib:7.1f} MiB  "
                      f"peak {row['peak_mib']:7.0f} MiB  (first call {first:.1f} s)", flush=True)
        if args.profile:
            kinds = profile_kinds(model, sd15_inputs(max(args.batches)))
            rows.append({"model": label, "profile_batch": max(args.batches), "kinds_ms": kinds})
            print(f"sd15 {label} eager batch {max(args.batches)} by kind (ms): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()), flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def perturbed_output(model: nn.Module, eps: float, seed: int = 0) -> Iterator[None]:
    """Multiply every output of ``model`` by ``1 + eps * N(0, 1)`` noise (float-rounding size for ``eps = 1e-6``):
    how far a sampler carries a difference that small is the floor of any deployed-vs-fake-quant comparison."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        sample = output_tensor(out)
        noise = torch.randn(sample.shape, generator=generator).to(sample.device, sample.dtype)
        sample.mul_(1 + eps * noise)

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_zoo(args: argparse.Namespace) -> dict[str, Any]:
    """FP vs fake-quant vs deployed sampling on a zoo model (images/s, PSNR of the same seeds), plus the floor: the
    fake-quant model against itself with float-noise-sized output perturbations."""
    from questdiff.eval.sampling import generate
    from questdiff.pipelines import denoiser_of, quiet, set_denoiser

    device = torch.device(args.device)
    pipe = qd.zoo.load(args.zoo, device=device)
    quiet(pipe)
    fp_unet = copy.deepcopy(denoiser_of(pipe))
    if args.quantized:
        quantized = qd.load(args.quantized, base=denoiser_of(pipe))
    else:
        calib = qd.collect_calibration(pipe, num_samples=args.zoo_calib_samples, num_inference_steps=args.zoo_steps,
                                       progress=False)
        quantized = qd.quantize(denoiser_of(pipe), "W8A8", calib, method="rtn", progress=False)
    deployed = convert(copy.deepcopy(quantized))
    result: dict[str, Any] = {"zoo": args.zoo, "images": args.zoo_images, "batch": args.zoo_batch, "device": str(device)}
    samples = {}
    for label, unet in (("FP", fp_unet), ("fake-quant", quantized), ("deployed", deployed)):
        set_denoiser(pipe, unet)
        if device.type == "cuda":
            generate(pipe, args.zoo_batch, batch_size=args.zoo_batch, num_inference_steps=args.zoo_steps,
                     desc=f"warm-up {label}")
        _sync(device)
        start = time.perf_counter()
        samples[label] = generate(pipe, args.zoo_images, batch_size=args.zoo_batch, num_inference_steps=args.zoo_steps,
                                  desc=label)
        _sync(device)
        seconds = time.perf_counter() - start
        result[f"{label}_images_per_s"] = args.zoo_images / seconds
        print(f"zoo {args.zoo} {label:10s}: {args.zoo_images / seconds:8.1f} images/s", flush=True)
    for label, unet in (("FP", fp_unet), ("fake-quant", quantized)):
        set_denoiser(pipe, unet)
        with perturbed_output(unet, args.floor_eps):
            again = generate(pipe, args.zoo_images, batch_size=args.zoo_batch, num_inference_steps=args.zoo_steps,
                             desc=f"{label} perturbed")
        result[f"psnr_{label.lower().replace('-', '_')}_vs_itself_perturbed_db"] = _psnr(again, samples[label])
    result["floor_eps"] = args.floor_eps
    result["psnr_deployed_vs_fake_quant_db"] = _psnr(samples["deployed"], samples["fake-quant"])
    result["psnr_fake_quant_vs_fp_db"] = _psnr(samples["fake-quant"], samples["FP"])
    print(f"zoo PSNR deployed vs fake-quant {result['psnr_deployed_vs_fake_quant_db']:.1f} dB; floor (each model vs "
          f"itself with outputs x (1 + {args.floor_eps:g} N(0,1))): fake-quant "
          f"{result['psnr_fake_quant_vs_itself_perturbed_db']:.1f} dB, FP {result['psnr_fp_vs_itself_perturbed_db']:.1f} "
          f"dB; fake-quant vs FP {result['psnr_fake_quant_vs_fp_db']:.1f} dB", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-sd15", dest="sd15", action="store_false", help="skip the SD-1.5 latency table")
    parser.add_argument("--no-eager", dest="eager", action="store_false", help="skip the eager timings")
    parser.add_argument("--cuda-graph", action="store_true", help="also time CUDA-graph replays of the eager models")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--compile-batches", type=int, nargs="+", default=None,
                        help="batches for the compiled models (default: --batches)")
    parser.add_argument("--w4", action="store_true", help="also time W4A8 (packed 4-bit weights)")
    parser.add_argument("--profile", action="store_true", help="per-layer-kind breakdown at the largest batch")
    parser.add_argument("--zoo", default=None, help="zoo model for the sampling comparison (e.g. fmnist-ldm-cond)")
    parser.add_argument("--quantized", default=None, help="fake-quant checkpoint of --zoo (default: RTN W8A8 here)")
    parser.add_argument("--zoo-images", type=int, default=256)
    parser.add_argument("--zoo-batch", type=int, default=256)
    parser.add_argument("--zoo-steps", type=int, default=None, help="sampler steps (default: the pipeline's)")
    parser.add_argument("--zoo-calib-samples", type=int, default=64, help="calibration trajectories of the RTN model")
    parser.add_argument("--floor-eps", type=float, default=1e-6,
                        help="relative output noise of the floor measurement (default: 1e-6, float-rounding size)")
    parser.add_argument("--device", default="cuda", help="device of the --zoo comparison (the SD-1.5 table needs cuda)")
    parser.add_argument("--out", default="benchmarks/results/deploy_latency.json")
    args = parser.parse_args(argv)
    if (args.sd15 or args.device.startswith("cuda")) and not torch.cuda.is_available():
        print("deploy_latency: the SD-1.5 table needs a CUDA GPU; on a CPU run only the zoo comparison: "
              "--no-sd15 --zoo NAME --device cpu", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device.startswith("cuda") else "cpu"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    def save(rows: list[dict[str, Any]]) -> None:
        report["sd15"] = rows
        out.write_text(json.dumps(report, indent=2))

    if args.sd15:
        run_sd15(args, save)
    if args.zoo:
        report["zoo"] = run_zoo(args)
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
