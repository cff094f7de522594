"""Resolve the command line's ``--model`` (a diffusers pipeline folder, a zoo name, or nothing: the embedded
default) and ``--device`` arguments."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .devices import check_device


def load_pipeline(model: str | None, device: str | torch.device | None = None) -> tuple[Any, str]:
    """``(pipeline, name)`` for a folder path, a zoo model name, or ``None`` (the zoo's default model)."""
    from diffusers import DiffusionPipeline  # imported here: `questdiff --help` stays fast

    from . import zoo

    if model is None:
        if not zoo.has_default():
            raise ValueError("no --model given and the embedded default model is not installed; pass --model FOLDER")
        model = zoo.DEFAULT_MODEL
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass a folder written by save_pretrained")
        class_name = json.loads(index.read_text()).get("_class_name")
        zoo_kinds = {cls.__name__: kind for kind, cls in zoo.PIPELINE_CLASSES.items()}
        if class_name in zoo_kinds:  # (zoo folders may name shared components instead of holding them)
            pipe = zoo.load_pipeline(path, zoo_kinds[class_name])
        else:
            pipe = DiffusionPipeline.from_pretrained(path, low_cpu_mem_usage=False)
        name = path.name
    else:
        names = [e.name for e in zoo.list_models() if e.kind != zoo.FEATURES]
        if model not in names:
            raise ValueError(f"--model {model!r} is neither a pipeline folder nor a zoo diffusion model (zoo models: "
                             f"{', '.join(names)})")
        pipe = zoo.load(model)
        name = model
    if device is not None:
        pipe = pipe.to(device)
    return pipe, name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> torch.device:
    """The ``--device`` value as a usable ``torch.device`` (``None``: ``default_device()``); raises ``ValueError``
    naming the fix for a misspelt device or one this machine does not have."""
    return torch.device(default_device()) if name is None else check_device(name, "--device")
