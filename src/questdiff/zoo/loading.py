"""Loading saved zoo folders (shipped weights or training outputs) with checked files."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .pipelines import ClassConditionalDiTPipeline, ClassConditionalLDMPipeline, LatentDiffusionPipeline, PixelDiffusionPipeline
from .registry import CLASS_DIT, CLASS_LATENT, LATENT, PIXEL, shared_components, weight_files

if TYPE_CHECKING:  # imported lazily below: questdiff.eval may import the zoo
    from ..eval.feature_net import FeatureNet

PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    PIXEL: PixelDiffusionPipeline,
    LATENT: LatentDiffusionPipeline,
    CLASS_LATENT: ClassConditionalLDMPipeline,
    CLASS_DIT: ClassConditionalDiTPipeline,
}


class ZooWeightsError(OSError):
    """A weights file of a zoo model is missing or unreadable."""


def check_weights(folder: str | Path) -> None:
    """Raises ``ZooWeightsError`` naming the first missing or corrupt file of a saved zoo folder."""
    folder = Path(folder)
    try:
        files = weight_files(folder)
    except FileNotFoundError as err:
        raise ZooWeightsError(str(err)) from None
    for paths in files.values():
        for path in paths:
            if not path.is_file():
                raise ZooWeightsError(f"missing weights file {path}; reinstall questdiff or retrain the model")
            if path.suffix == ".safetensors":
                try:
                    with safe_open(str(path), framework="pt") as f:
                        f.keys()
                except SafetensorError as err:
                    raise ZooWeightsError(
                        f"corrupt weights file {path} ({err}); reinstall questdiff or retrain the model"
                    ) from None


def load_pipeline(
    folder: str | Path, kind: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> DiffusionPipeline:
    """Loads a saved zoo pipeline folder of ``kind`` (float32 unless ``dtype``) after checking its files; shared
    components come from their shared folders."""
    check_weights(folder)
    dtype = dtype or torch.float32
    index = json.loads((Path(folder) / "model_index.json").read_text())
    shared = {}
    for name, path in shared_components(Path(folder)).items():
        library, class_name = index[name]
        shared[name] = getattr(importlib.import_module(library), class_name).from_pretrained(
            path, dtype=dtype, low_cpu_mem_usage=False)
    pipe = PIPELINE_CLASSES[kind].from_pretrained(folder, dtype=dtype, low_cpu_mem_usage=False, **shared)
    return pipe.to(device) if device is not None else pipe


def load_feature_net_from(folder: str | Path, device: str | torch.device | None = None) -> FeatureNet:
    """A ``FeatureNet`` (float32, eval mode) from a folder with ``config.json`` and ``model.safetensors``."""
    from ..eval.feature_net import FeatureNet

    folder = Path(folder)
    check_weights(folder)
    config = json.loads((folder / "config.json").read_text())
    net = FeatureNet(num_classes=config["num_classes"])
    state = load_file(folder / "model.safetensors")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.eval().requires_grad_(False)
    return net.to(device) if device is not None else net
