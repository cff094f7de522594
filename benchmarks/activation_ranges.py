"""Activation ranges per timestep before and after QuEST finetuning (the paper's observation that finetuning
narrows them, §3.2 / Supp.).

For every calibrated timestep, the range [min, max] of the input activations of the layers that finetuning trains
(TLA's time-embedding projections and CMA's critical layers' downstream inputs are captured at every quantized
layer) is measured on the calibration rows of that timestep, once after Q-Diffusion-style calibration
(``qdiffusion``: BRECQ + per-timestep init) and once after QuEST's TLA + CMA on top of it. Writes a json and a PNG
plot.

    python benchmarks/activation_ranges.py --device cuda --order mixed   # paper-default TLA/CMA epochs
    python benchmarks/activation_ranges.py --quick                        # CPU, tiny budget
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import questdiff as qd  # noqa: E402
from questdiff import pipelines  # noqa: E402
from questdiff.calibration import BrecqConfig, CMAConfig, TLAConfig  # noqa: E402
from questdiff.calibration.finetune import ORDERS  # noqa: E402
from questdiff.calibration.methods import share_stages  # noqa: E402
from questdiff.prepare import quant_layers, quant_state  # noqa: E402


@torch.no_grad()
def ranges_per_timestep(unet: torch.nn.Module, calib: qd.CalibrationSet, device: str,
                        rows_per_t: int = 64) -> dict[float, tuple[float, float, float]]:
    """(min, max, std) over the inputs of every quantized layer, per calibrated timestep (its first ``rows_per_t``
    calibration rows); quantization off so the numbers show the real-valued distributions the quantizers cover."""
    stats: dict[float, list[torch.Tensor]] = {}
    current: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: current.append(a[0].detach().flatten().float().cpu()))
             for layer in quant_layers(unet).values()]
    try:
        with quant_state(unet, weight=True, act=False):
            for t in calib.timesteps:
                rows = torch.nonzero(calib.ts == t).flatten()[:rows_per_t]
                current.clear()
                unet(**calib.model_kwargs(rows, device))
                stats[t] = [torch.cat(current)]
    finally:
        for h in hooks:
            h.remove()
    return {t: (v[0].min().item(), v[0].max().item(), v[0].std().item()) for t, v in stats.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", default="fmnist-ldm-cond")
    p.add_argument("--preset", default="W4A4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny budget: TLA 5 epochs x batch 8, CMA 1 epoch x batch 16")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration trajectories (default 256; quick 16)")
    p.add_argument("--recon-iters", type=int, default=None, help="BRECQ iterations per unit (default 500; quick 50)")
    p.add_argument("--order", default=None, choices=ORDERS, help="TLA/CMA batch order (default: the configs')")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--work", default=None, help="stage checkpoints, resumed by a re-run (default: OUT/activation_ranges_work-...)")
    args = p.parse_args()
    quick = args.quick
    pipe = qd.zoo.load(args.zoo, device=args.device)
    calib = qd.collect_calibration(pipe, num_samples=args.calib_samples or (16 if quick else 256),
                                   calib_steps=10 if quick else 20, progress=False)
    fp_unet = pipelines.denoiser_of(pipe)
    brecq = BrecqConfig(iters=args.recon_iters or (50 if quick else 500))
    order = {"order": args.order} if args.order else {}
    tla = TLAConfig(epochs=5, batch_size=8, **order) if quick else TLAConfig(**order)
    cma = CMAConfig(epochs=1, batch_size=16, **order) if quick else CMAConfig(**order)
    work = Path(args.work or Path(args.out) / f"activation_ranges_work-{args.zoo}-{args.preset}")
    base = qd.quantize(copy.deepcopy(fp_unet), args.preset, calib, "qdiffusion", device=args.device, brecq=brecq,
                       work_dir=work / "qdiffusion")
    share_stages(work / "qdiffusion", work / "quest", "qdiffusion", "act_init")  # QuEST continues from the same BRECQ
    quest = qd.quantize(copy.deepcopy(fp_unet), args.preset, calib, "quest", device=args.device, brecq=brecq,
                        tla=tla, cma=cma, work_dir=work / "quest")
    before, after = ranges_per_timestep(base, calib, args.device), ranges_per_timestep(quest, calib, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"activation_ranges-{args.zoo}-{args.preset}" + ("-quick" if quick else "")
    settings = {"quick": quick, "brecq": brecq.iters, "tla": [tla.epochs, tla.batch_size, tla.order],
                "cma": [cma.epochs, cma.batch_size, cma.order], "rows_per_timestep": len(calib) // len(calib.timesteps)}
    (out / f"{stem}.json").write_text(json.dumps({"before": before, "after": after, "settings": settings}, indent=2))
    ts = list(before)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, data, color in (("after BRECQ (Q-Diffusion-style)", before, "tab:red"), ("after QuEST TLA + CMA", after, "tab:blue")):
        ax.fill_between(ts, [data[t][0] for t in ts], [data[t][1] for t in ts], alpha=0.25, color=color, label=label)
    ax.invert_xaxis()
    ax.set_xlabel("timestep (sampling order →)")
    ax.set_ylabel("layer-input activation range")
    ax.set_title(f"{args.zoo} {args.preset}: activation ranges per timestep")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    for t in ts:
        print(f"t={t:6.0f}  before [{before[t][0]:8.2f}, {before[t][1]:8.2f}] std {before[t][2]:.3f}   "
              f"after [{after[t][0]:8.2f}, {after[t][1]:8.2f}] std {after[t][2]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
