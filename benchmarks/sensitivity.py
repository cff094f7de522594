"""Which layers CMA's ``critical="sensitivity"`` mode picks on each zoo model (the paper's Fig. 3 experiment), next to
the per-family roles of ``critical="auto"`` (spec §2.8).

For each model: calibration trajectories from its default sampler, the model prepared at ``--preset``, then every
layer outside the time-embedding roles gets a 4-bit input alone (all else FP) and is scored by the output MSE against
the FP model over every calibrated timestep; the same per role group. Writes ``sensitivity.json`` and ``.md``.

    python benchmarks/sensitivity.py                       # every shipped zoo diffusion model, CPU is enough
    python benchmarks/sensitivity.py --zoo fmnist-ldm --top-k 12
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

import questdiff as qd
from questdiff import pipelines, zoo
from questdiff.adapters.base import TIME_EMBEDDING_ROLES
from questdiff.calibration.cma import CRITICAL_ROLES, CMAConfig, critical_layers
from questdiff.calibration.sensitivity import layer_sensitivity
from questdiff.config import preset
from questdiff.io_utils import atomic_write_text
from questdiff.prepare import handle, prepare
from questdiff.timestep import TimestepSchedule


def rank_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Sensitivity ranking of one zoo model's layers and roles, with the layers ``critical="auto"`` trains."""
    pipe = zoo.load(name, device=args.device)
    pipelines.quiet(pipe)
    calib = qd.collect_calibration(pipe, num_samples=args.calib_samples, calib_steps=args.calib_steps,
                                   batch_size=args.calib_samples, seed=args.seed, progress=False)
    model = copy.deepcopy(pipelines.denoiser_of(pipe))
    prepare(model, preset(args.preset), TimestepSchedule.from_timesteps(calib.timesteps))
    family, auto = critical_layers(model, calib, CMAConfig(), device=args.device)
    common = {"bits": args.bits, "samples_per_t": args.samples_per_t, "exclude_roles": TIME_EMBEDDING_ROLES,
              "device": args.device, "seed": args.seed, "progress": not args.quiet}
    layers = layer_sensitivity(model, calib, group_by="layer", **common)
    roles = layer_sensitivity(model, calib, group_by="role", **common)
    infos = handle(model).layers
    top = [{"layer": s.name, "mse": s.mse, "roles": sorted(infos[s.name].roles)} for s in layers[: args.top_k]]
    return {
        "model": name, "family": family, "auto_roles": list(CRITICAL_ROLES[family]),
        "auto_layers": len(auto), "top_layers": top,
        "top_in_auto": sum(t["layer"] in set(auto) for t in top),
        "roles": [{"role": s.name, "mse": s.mse, "layers": len(s.layers)} for s in roles],
        "median_layer_mse": layers[len(layers) // 2].mse, "scored_layers": len(layers),
    }


def markdown(reports: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = ["# Activation sensitivity of the zoo models", "", f"Settings: `{json.dumps(settings)}`", ""]
    for r in reports:
        lines += [f"## {r['model']} (family {r['family']!r}; auto roles {', '.join(r['auto_roles'])}: "
                  f"{r['auto_layers']} layers)", "",
                  f"Top {len(r['top_layers'])} of {r['scored_layers']} layers (median output MSE "
                  f"{r['median_layer_mse']:.3g}); {r['top_in_auto']} of them are in the auto set.", "",
                  "| rank | layer | roles | output MSE |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | `{t['layer']}` | {', '.join(t['roles'])} | {t['mse']:.3g} |" for i, t in enumerate(r["top_layers"])]
        lines += ["", "| role | layers | output MSE (all its layers at once) |", "|---|---|---|"]
        lines += [f"| {x['role']} | {x['layers']} | {x['mse']:.3g} |" for x in r["roles"]]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", nargs="*", default=None, help="zoo model names (default: every shipped diffusion model)")
    p.add_argument("--preset", default="W4A4")
    p.add_argument("--bits", type=int, default=4, help="probe bits of the layer inputs")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration trajectories")
    p.add_argument("--calib-steps", type=int, default=20, help="calibrated timesteps")
    p.add_argument("--samples-per-t", type=int, default=4, help="rows per timestep scored")
    p.add_argument("--top-k", type=int, default=8, help="layers listed (CMAConfig.top_k)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.zoo or [e.name for e in zoo.list_models() if e.shipped and e.kind != zoo.registry.FEATURES]
    if not names:
        print("sensitivity: no zoo diffusion model is shipped", file=sys.stderr)
        return 2
    settings = {k: getattr(args, k) for k in ("preset", "bits", "calib_samples", "calib_steps", "samples_per_t", "seed", "device")}
    reports = [rank_model(name, args) for name in names]
    out = Path(args.out)
    atomic_write_text(out / "sensitivity.json", json.dumps({"settings": settings, "models": reports}, indent=2))
    atomic_write_text(out / "sensitivity.md", markdown(reports, settings))
    print(markdown(reports, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
