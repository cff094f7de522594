"""Storage conversion of a trained zoo folder (float32 training output -> float16 shipped weights)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file

from .card import TRAIN_INFO_FILE, read_train_info, write_card, write_json
from .loading import check_weights, load_pipeline
from .registry import FEATURES, METRICS_FILE, get_spec, read_metrics

log = logging.getLogger(__name__)
KEEP_FP32 = ("class_embedder",)  # tiny, and kept full precision like the paper's conditioning


def export_model(name: str, src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Writes zoo model ``name`` from folder ``src`` to ``dst`` with floating weights stored as ``dtype``.

    ``train_info.json`` is carried over; ``metrics.json`` keeps the source FID as ``fp32_fid`` so the quality of
    the stored weights can be compared after ``dst`` is evaluated.
    """
    src, dst = Path(src), Path(dst)
    spec = get_spec(name)
    check_weights(src)
    dst.mkdir(parents=True, exist_ok=True)
    if spec.kind == FEATURES:
        state = load_file(src / "model.safetensors")
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, dst / "model.safetensors")
        shutil.copy2(src / "config.json", dst / "config.json")
    else:
        pipe = load_pipeline(src, spec.kind)
        for component, module in pipe.components.items():
            if isinstance(module, ModelMixin) and component not in KEEP_FP32:
                module.to(dtype)
        pipe.save_pretrained(dst)
    info = read_train_info(src)
    kept = [c for c in KEEP_FP32 if (src / c).is_dir()]
    info["storage_dtype"] = str(dtype).removeprefix("torch.") + (f" ({', '.join(kept)} float32)" if kept else "")
    write_json(dst / TRAIN_INFO_FILE, info)
    metrics = read_metrics(src)
    carried = {"fp32_fid": metrics["fid"]} if "fid" in metrics else {}
    if "test_accuracy" in metrics:
        carried["fp32_test_accuracy"] = metrics["test_accuracy"]
    if carried:
        write_json(dst / METRICS_FILE, {**read_metrics(dst), **carried})
    write_card(name, dst)
    log.info("%s: exported %s -> %s as %s", name, src, dst, dtype)
    return dst
