"""Model cards: ``README.md`` of a zoo model folder, rendered from ``train_info.json`` and ``metrics.json``."""
from __future__ import annotations

import json
from pathlib import Path

from .registry import fid_label, get_spec, read_metrics

TRAIN_INFO_FILE = "train_info.json"


def read_train_info(folder: Path) -> dict:
    """Contents of ``train_info.json`` in ``folder`` (empty when absent)."""
    path = Path(folder) / TRAIN_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data: dict) -> None:
    """Writes ``data`` as indented json through a temporary file (atomic rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _stage_rows(stages: dict) -> list[str]:
    rows = ["| stage | steps | batch | lr (peak) | EMA | time (s) | final loss |", "|---|---|---|---|---|---|---|"]
    for stage, s in stages.items():
        cfg = s["config"]
        rows.append(
            f"| {stage} | {s['steps']} | {cfg['batch_size']} | {cfg['lr']:g} | {cfg['ema_decay'] or '-'} | "
            f"{s['seconds']:.0f} | {s['final_loss']:.4f} |"
        )
    return rows


def _metric_lines(metrics: dict, fid_label: str) -> list[str]:
    lines = []
    if "fid" in metrics:
        lines.append(f"- {fid_label}: **{metrics['fid']:.2f}** ({metrics['num_samples']} samples vs the "
                     f"{metrics['reference']}; train-vs-test floor {metrics['fid_train_vs_test']:.2f}; "
                     f"sampler {metrics['scheduler']} {metrics['sampler']})")
    if "class_accuracy" in metrics:
        acc = metrics["class_accuracy"]
        per_class = ", ".join(f"{c}: {v:.3f}" for c, v in acc["per_class"].items())
        lines.append(f"- classifier accuracy on the samples: mean {acc['mean']:.3f} (per class {per_class})")
    if "vae" in metrics:
        vae = metrics["vae"]
        lines.append(f"- autoencoder on the test set: PSNR {vae['recon_psnr_db']:.2f} dB, "
                     f"{fid_label} of reconstructions {vae['recon_fid']:.2f}")
    if "test_accuracy" in metrics:
        lines.append(f"- test accuracy: **{metrics['test_accuracy']:.4f}**")
    if "fp32_test_accuracy" in metrics:
        lines.append(f"- test accuracy of the float32 weights before fp16 storage: {metrics['fp32_test_accuracy']:.4f}")
    if "fp32_fid" in metrics:
        lines.append(f"- {fid_label} of the float32 weights before fp16 storage: {metrics['fp32_fid']:.2f}")
    return lines


def render_card(name: str, info: dict, metrics: dict) -> str:
    """Markdown model card of zoo model ``name``."""
    spec = get_spec(name)
    lines = [
        f"# questdiff zoo: `{name}`",
        "",
        f"Mirrors: {spec.mirrors}. Trained by the questdiff project on {spec.dataset} (train split, 28x28 zero-padded "
        "to 32x32). Load it with `questdiff.zoo.load(...)`"
        + (" (feature nets: `load_feature_net`)." if spec.sampler is None else "."),
        "",
    ]
    if spec.sampler is not None:
        s = spec.sampler
        guidance = f", guidance {s.guidance_scale}" if s.guidance_scale is not None else ""
        lines += [f"Default sampler: {s.scheduler} {s.num_inference_steps} steps, eta {s.eta}{guidance}.", ""]
    if info:
        params = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in info.get("params", {}).items())
        lines += [
            "## Training",
            "",
            f"- parameters: {params}",
            f"- hardware: {info.get('hardware')}; torch {info.get('torch')}, diffusers {info.get('diffusers')}",
            f"- date: {info.get('date')}; options: {info.get('options')}",
            "",
            *_stage_rows(info.get("stages", {})),
            "",
        ]
        notes = info.get("notes")
        if notes:
            lines += [notes, ""]
    metric_lines = _metric_lines(metrics, fid_label(spec.feature_net))
    if metric_lines:
        lines += ["## Quality", "", *metric_lines, ""]
    if info.get("storage_dtype"):
        lines += [f"Weights are stored as {info['storage_dtype']} and load as float32 by default.", ""]
    return "\n".join(lines)


def write_card(name: str, folder: Path) -> Path:
    """(Re)writes ``folder/README.md`` from the folder's ``train_info.json`` and ``metrics.json``."""
    folder = Path(folder)
    path = folder / "README.md"
    path.write_text(render_card(name, read_train_info(folder), read_metrics(folder)))
    return path
