"""Deployed-model speed and size on the GPU, side by side in one process.

1. SD-1.5: an SD-1.5-architecture UNet2DConditionModel (random weights, 64x64 latent, 77x768 context) at each
   ``--batches`` size, ``--models`` (bf16, questdiff presets deployed, the torchao fp8 row-wise peer) in each of
   ``--modes`` (eager, cuda-graph: the whole call, timestep hook included, captured once; compile; compile+graph).
   Latency (median of CUDA-event timed forwards), weight MiB, peak memory; with ``--profile`` a per-layer-kind
   breakdown (conv / linear / attention / activation quantization / other) of the eager forward at the largest
   batch.
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
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

import questdiff as qd
from architectures import build_sd15  # benchmarks/ is on sys.path when run as a script
from deployed_bench import MODES, deployed_constant, graphed, measure_modes, median_ms, torchao_fp8
from questdiff.calibration.common import output_tensor
from questdiff.deploy import convert
from questdiff.deploy.convert import deployment

CONTEXT = (77, 768)


class GraphedDenoiser(nn.Module):
    """A drop-in ``pipe.unet`` whose first call for each input shape captures the wrapped denoiser in a CUDA graph
    and whose later calls copy their tensors into the captured inputs and replay: what a serving stack does with a
    deployed model, over a real pipeline's every step (the timestep arrives as a device tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self._graphs: dict[tuple, tuple[Callable[[], Any], dict[str, torch.Tensor]]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **kwargs: Any) -> Any:
        if any(v is not None for v in kwargs.values()):
            raise ValueError(f"GraphedDenoiser passes only sample, timestep and encoder_hidden_states, got {kwargs}")
        t = torch.as_tensor(timestep, device=sample.device)
        key = (tuple(sample.shape), tuple(t.shape), tuple(encoder_hidden_states.shape))
        if key not in self._graphs:
            static = {"sample": sample.clone(), "timestep": t.clone(), "encoder_hidden_states": encoder_hidden_states.clone()}
            self._graphs[key] = (graphed(self.model, static), static)
        replay, static = self._graphs[key]
        static["sample"].copy_(sample)
        static["timestep"].copy_(t)
        static["encoder_hidden_states"].copy_(encoder_hidden_states)
        out = replay().sample.clone()
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


def sd15_model(label: str) -> nn.Module:
    """bf16, a questdiff preset deployed (constant quantizer values) or the torchao fp8 peer, on the GPU."""
    with torch.device("cuda"):
        unet = build_sd15()
    if label == "bf16":
        return unet.to(torch.bfloat16).eval()
    if label == "torchao-fp8-row":
        return torchao_fp8(unet.to(torch.bfloat16).eval())
    return deployed_constant(unet, label)


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
             "questdiff::attention": "attention", "questdiff::attention_qk": "attention",
             "aten::_scaled_dot_product_flash_attention": "attention",
             "aten::_scaled_dot_product_efficient_attention": "attention",
             "aten::_scaled_dot_product_cudnn_attention": "attention", "questdiff::quantize": "act quantize"}
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


def _graph_serves_every_step(model: nn.Module, inputs: dict[str, torch.Tensor], replay: Callable[[], Any]) -> float:
    """Relative difference between the captured graph replayed at another timestep and an eager call there."""
    inputs["timestep"].fill_(900)
    with torch.no_grad():
        got = replay().sample.clone()
        ref = model(**inputs).sample
    inputs["timestep"].fill_(500)
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def run_sd15(args: argparse.Namespace, save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def batches(mode: str) -> list[int]:
        return args.compile_batches if mode.startswith("compile") and args.compile_batches else args.batches

    for label in args.models:
        try:
            model = sd15_model(label)
        except Exception as err:  # noqa: BLE001 - a peer that cannot be built is recorded, the rest still runs
            rows.append({"model": label, "error": repr(err)})
            print(f"sd15 {label}: cannot build: {err!r}", flush=True)
            continue

        def check_graph(row: dict[str, Any], mode: str, call: Callable[[], Any], inputs: dict[str, Any],
                        model: nn.Module = model) -> None:
            if mode.endswith("graph"):
                row["graph_vs_eager_at_another_t"] = _graph_serves_every_step(model, inputs, call)

        measure_modes(model, label, args.modes, batches, sd15_inputs, args.reps, "sd15", rows, lambda: save(rows),
                      check_graph)
        if args.profile and label != "torchao-fp8-row":
            kinds = profile_kinds(model, sd15_inputs(max(args.batches)))
            rows.append({"model": label, "profile_batch": max(args.batches), "kinds_ms": kinds})
            print(f"sd15 {label} eager batch {max(args.batches)} by kind (ms): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()), flush=True)
        torch.cuda.empty_cache()
    return rows


def sd15_pipeline(unet: nn.Module) -> Any:
    """A StableDiffusionPipeline of the SD-1.5 architecture (random weights; SD's VAE; no text encoder: prompt
    embeddings are given) with a DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    with torch.device("cuda"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512).to(torch.bfloat16).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(args: argparse.Namespace) -> list[dict[str, Any]]:
    """ms per image of a whole pipeline run (``--pipeline-steps`` DDIM steps, CFG 7.5, batch ``--pipeline-batch``,
    VAE decode included) with the UNet eager and CUDA-graphed (``GraphedDenoiser``: one graph serves every step),
    for each of ``--models``; the graphed run's latents are compared with the eager run's."""
    rows: list[dict[str, Any]] = []
    batch = args.pipeline_batch
    g = torch.Generator(device="cuda").manual_seed(1)
    embeds = torch.randn(batch, *CONTEXT, device="cuda", dtype=torch.bfloat16, generator=g)
    negative = torch.randn(batch, *CONTEXT, device="cuda", dtype=torch.bfloat16, generator=g)
    for label in args.models:
        if label == "torchao-fp8-row":
            continue  # compiled only; not captured here
        try:
            unet = sd15_model(label)
        except Exception as err:  # noqa: BLE001
            rows.append({"model": label, "mode": "pipeline", "error": repr(err)})
            continue
        latents: dict[str, torch.Tensor] = {}
        for mode, denoiser in (("pipeline-eager", unet), ("pipeline", GraphedDenoiser(unet))):
            pipe = sd15_pipeline(denoiser)

            def call(output_type: str = "pt") -> Any:
                return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=args.pipeline_steps,
                            guidance_scale=7.5, output_type=output_type, generator=torch.Generator("cuda").manual_seed(0))

            try:
                with torch.no_grad():
                    latents[mode] = call("latent").images
                    ms = median_ms(call, max(3, args.reps // 5))
            except Exception as err:  # noqa: BLE001
                rows.append({"model": label, "mode": mode, "batch": batch, "error": repr(err)})
                print(f"pipeline {label} {mode}: FAILED {err!r}", flush=True)
                continue
            row = {"model": label, "mode": mode, "batch": batch, "steps": args.pipeline_steps, "ms": ms / batch,
                   "ms_per_run": ms}
            if mode == "pipeline" and "pipeline-eager" in latents:
                a, b = latents["pipeline"].float(), latents["pipeline-eager"].float()
                row["latents_rel_diff_vs_eager"] = float((a - b).norm() / b.norm())
            rows.append(row)
            print(f"pipeline {label:6s} {mode:14s} batch {batch}: {ms / batch:7.2f} ms/image ({ms:.0f} ms per run)"
                  + (f"  graphed vs eager latents {row['latents_rel_diff_vs_eager']:.1e}" if "latents_rel_diff_vs_eager"
                     in row else ""), flush=True)
        del unet
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
    counts = deployment(deployed)
    print(f"zoo {args.zoo} deployed: {counts.describe()}", flush=True)
    result: dict[str, Any] = {"zoo": args.zoo, "images": args.zoo_images, "batch": args.zoo_batch, "device": str(device),
                              "quantized": args.quantized or "RTN W8A8", "deployment": counts.describe(),
                              "simulated_modules": counts.simulated}
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
    parser.add_argument("--models", nargs="+", default=["bf16", "W8A8", "W4A8"],
                        help="bf16, questdiff presets (W8A8, W4A8, ...) and the peer torchao-fp8-row (compiled only)")
    parser.add_argument("--modes", nargs="+", default=["eager", "cuda-graph"],
                        choices=list(MODES))
    parser.add_argument("--compile-batches", type=int, nargs="+", default=None,
                        help="batches for the compiled modes (default: --batches)")
    parser.add_argument("--profile", action="store_true", help="per-layer-kind breakdown at the largest batch")
    parser.add_argument("--pipeline", action="store_true",
                        help="also time whole StableDiffusionPipeline runs (eager and CUDA-graphed UNet)")
    parser.add_argument("--pipeline-batch", type=int, default=8)
    parser.add_argument("--pipeline-steps", type=int, default=20)
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
    if args.pipeline:
        report["pipeline"] = run_pipeline(args)
        out.write_text(json.dumps(report, indent=2))
    if args.zoo:
        report["zoo"] = run_zoo(args)
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
