"""Deployed diffusion transformers' speed and size on the GPU, side by side in one process: bf16 against questdiff
presets deployed (``--models``, e.g. W8A8 W4A8) and the torchao fp8 row-wise peer (``torchao-fp8-row``, compiled),
in each of ``--modes`` (eager, cuda-graph, compile, compile+graph), for three real-scale architectures with random
weights (speed does not depend on the values):

- ``flux``: a FLUX-scale ``FluxTransformer2DModel`` (2 double-stream + 8 single-stream blocks, 24 heads x 128,
  4096 image + 512 text tokens), batch 1 and 4;
- ``dit``: a DiT-XL/2-scale ``DiTTransformer2DModel`` (28 layers, 16 heads x 72, 256² images: 256 tokens), batch 8
  and 32;
- ``pixart``: a PixArt-alpha-scale ``PixArtTransformer2DModel`` (28 layers, 1024² images: 4096 tokens, 120 T5
  tokens), batch 1.

    python benchmarks/dit_latency.py --out benchmarks/results/dit_latency-h200.json        # GPU machine
    python benchmarks/dit_latency.py --tiny --modes eager --out /tmp/dit.json               # CPU smoke run

Writes ``{"flux": [rows], "dit": [...], "pixart": [...]}`` with rows ``{model, mode, batch, ms, weight_mib}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from deployed_bench import MODES, deployed_constant, measure_modes, torchao_fp8

# name -> (diffusers class, full config, tiny config, batches, timestep range (high, low))
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], dict[str, Any], tuple[int, ...], tuple[float, float]]] = {
    "flux": ("FluxTransformer2DModel",
             {"num_layers": 2, "num_single_layers": 8, "attention_head_dim": 128, "num_attention_heads": 24,
              "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True},
             {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
              "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
              "axes_dims_rope": (4, 6, 6)},
             (1, 4), (1.0, 0.0)),
    "dit": ("DiTTransformer2DModel",
            {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
             "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000},
            {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
             "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 1000},
            (8, 32), (999.0, 1.0)),
    "pixart": ("PixArtTransformer2DModel",
               {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
                "num_layers": 28, "sample_size": 128, "patch_size": 2, "cross_attention_dim": 1152,
                "caption_channels": 4096, "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
                "use_additional_conditions": False},
               {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
                "num_layers": 2, "sample_size": 8, "patch_size": 2, "cross_attention_dim": 16,
                "caption_channels": 32, "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
                "use_additional_conditions": False},
               (1,), (999.0, 1.0)),
}


def build(name: str, tiny: bool, device: torch.device) -> nn.Module:
    import diffusers

    cls_name, full, small, _, _ = ARCHITECTURES[name]
    with torch.device(device):
        return getattr(diffusers, cls_name)(**(small if tiny else full)).eval()


def inputs(name: str, model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The denoiser's keyword arguments for one forward at ``batch`` (random, on ``device``)."""
    c = model.config
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    if name == "flux":
        side = 8 if c.joint_attention_dim < 1024 else 64  # 64 x 64 packed tokens: a 1024² image
        text = 8 if c.joint_attention_dim < 1024 else 512
        img_ids = torch.zeros(side * side, 3, device=device)
        img_ids[:, 1] = torch.arange(side, device=device).repeat_interleave(side)
        img_ids[:, 2] = torch.arange(side, device=device).repeat(side)
        return {"hidden_states": randn(batch, side * side, c.in_channels),
                "encoder_hidden_states": randn(batch, text, c.joint_attention_dim),
                "pooled_projections": randn(batch, c.pooled_projection_dim),
                "timestep": torch.full((batch,), 0.5, device=device), "img_ids": img_ids,
                "txt_ids": torch.zeros(text, 3, device=device), "guidance": torch.full((batch,), 3.5, device=device),
                "return_dict": False}
    latent = randn(batch, c.in_channels, c.sample_size, c.sample_size)
    t = torch.full((batch,), 500, device=device)
    if name == "dit":
        return {"hidden_states": latent, "timestep": t, "class_labels": torch.arange(batch, device=device) % 1000,
                "return_dict": False}
    tokens = 8 if c.caption_channels < 1024 else 120
    return {"hidden_states": latent, "timestep": t, "encoder_hidden_states": randn(batch, tokens, c.caption_channels),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}


def model_for(name: str, label: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    model = build(name, args.tiny, device)
    if label == "bf16":
        return model.to(args.dtype)
    if label == "torchao-fp8-row":
        return torchao_fp8(model.to(args.dtype))
    high, low = ARCHITECTURES[name][4]
    return deployed_constant(model, label, high=high, low=low, dtype=args.dtype)


def run(name: str, args: argparse.Namespace, device: torch.device,
        save: Callable[[], None], rows: list[dict[str, Any]]) -> None:
    batches = args.batches or list(ARCHITECTURES[name][3])
    for label in args.models:
        try:
            model = model_for(name, label, args, device)
        except Exception as err:  # noqa: BLE001 - a model that cannot be built is recorded, the rest still runs
            rows.append({"model": label, "error": repr(err)})
            print(f"{name} {label}: cannot build: {err!r}", flush=True)
            continue
        measure_modes(model, label, args.modes, lambda mode: batches,
                      lambda batch, m=model: inputs(name, m, batch, device, args.dtype), args.reps, f"{name:6s}", rows,
                      save)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--models", nargs="+", default=["bf16", "W8A8"],
                        help="bf16, questdiff presets (W8A8, W4A8, ...) and the peer torchao-fp8-row (compiled only)")
    parser.add_argument("--modes", nargs="+", default=["eager", "cuda-graph"], choices=list(MODES))
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: each architecture's own")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run of the plumbing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/dit_latency.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and (not args.tiny or any(m != "eager" for m in args.modes)):
        print("dit_latency: real-scale models and graph/compile modes need a CUDA GPU; on a CPU run --tiny --modes "
              "eager", file=sys.stderr)
        return 2
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    for name in args.architectures:
        report[name] = []
        run(name, args, device, save, report[name])
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
