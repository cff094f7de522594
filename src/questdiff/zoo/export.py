"""Storage conversion of a trained zoo folder (float32 training output -> float16 shipped weights), and sharing of
a component that several shipped pipelines hold identically (stored once, named in ``shared_components.json``)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file

from .card import TRAIN_INFO_FILE, read_train_info, write_card, write_json
from .loading import check_weights, load_pipeline
from .registry import FEATURES, METRICS_FILE, SHARED_FILE, get_spec, read_metrics, shared_components

log = logging.getLogger(__name__)
KEEP_FP32 = ("class_embedder",)  # tiny, and kept full precision like the paper's conditioning


def export_model(name: str, src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16,
                 share: Mapping[str, str | Path] | None = None) -> Path:
    """Writes zoo model ``name`` from folder ``src`` to ``dst`` with floating weights stored as ``dtype``.

    ``train_info.json`` is carried over; ``metrics.json`` keeps the source FID as ``fp32_fid`` so the quality of
    the stored weights can be compared after ``dst`` is evaluated. ``share`` (component -> shared folder, e.g.
    ``{"vae": "weights/_shared/fmnist-vae"}``) then replaces those components by references (``share_component``).
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
    for component, shared in (share or {}).items():
        share_component(dst, component, shared)
    log.info("%s: exported %s -> %s as %s", name, src, dst, dtype)
    return dst


def share_component(folder: str | Path, component: str, shared: str | Path) -> None:
    """Replaces the subfolder ``component`` of pipeline ``folder`` by a reference to the folder ``shared``.

    If ``shared`` does not exist the subfolder moves there; otherwise it must hold the same weights (equal tensors)
    and config, and is deleted. Raises ``ValueError`` naming the difference otherwise.
    """
    folder, shared = Path(folder), Path(shared)
    local = folder / component
    if not (local / "config.json").is_file():
        raise ValueError(f"{local} is not a saved component (no config.json); nothing to share")
    if not shared.exists():
        shared.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), str(shared))
    else:
        difference = _component_difference(local, shared)
        if difference:
            raise ValueError(f"{local} differs from the shared {shared} ({difference}); train the model with that "
                             f"component (e.g. zoo train --vae {shared}) or export without sharing it")
        shutil.rmtree(local)
    references = {name: os.path.relpath(path, folder.resolve()) for name, path in shared_components(folder).items()}
    references[component] = os.path.relpath(shared.resolve(), folder.resolve())
    write_json(folder / SHARED_FILE, references)
    log.info("%s: %s is now shared from %s", folder, component, shared)


def _component_difference(a: Path, b: Path) -> str:
    """What differs between two saved components ("" if nothing): config (``_``-keys aside) or weights."""
    configs = [{k: v for k, v in json.loads((p / "config.json").read_text()).items() if not k.startswith("_")} for p in (a, b)]
    if configs[0] != configs[1]:
        return "config"
    weights = [load_file(next(p.glob("*.safetensors"))) for p in (a, b)]
    if weights[0].keys() != weights[1].keys():
        return "weight names"
    changed = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    return f"weights {changed[:3]}" if changed else ""
