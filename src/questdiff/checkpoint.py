"""Save / load quantized denoisers: ``model.safetensors`` (the full state, so finetuned weights and every
quantizer row restore bit-exactly) + ``questdiff.json`` (versioned config, schedule, adapter, method, base-model
fingerprint). No pickle. Files are written atomically, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import ModelAdapter
from .config import QuantConfig
from .io_utils import atomic_path, atomic_write_text, ensure_writable_dir
from .prepare import fingerprint, handle, prepare
from .timestep import TimestepSchedule

logger = logging.getLogger(__name__)

FORMAT = "questdiff"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "questdiff.json"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    seen: dict[int, str] = {}
    out = {}
    for key, value in state.items():  # safetensors refuses shared storage: store shared tensors once
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        if ptr in seen and value.numel():
            out[key] = value.detach().clone().contiguous()
        else:
            seen[ptr] = key
            out[key] = value.detach().contiguous()
    return out


def save_state(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(_state(model), str(tmp))


def load_state(model: nn.Module, path: Path) -> None:
    """Load a state file written by ``save_state`` onto a model of the same structure (strict)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing; the checkpoint folder is incomplete")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"checkpoint file {path} is truncated or corrupt ({err}); re-save or re-quantize the model") from err
    device = next(model.parameters()).device
    result = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not match the model (missing {result.missing_keys[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}); load it onto the base model it was made from"
        )


def metadata(model: nn.Module) -> dict[str, Any]:
    from . import __version__

    h = handle(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "questdiff_version": __version__,
        "base_class": type(model).__name__,
        "base_fingerprint": h.fingerprint,
        "adapter": h.adapter.to_dict(),
        "quant_config": h.config.to_dict(),
        "schedule": h.schedule.to_dict(),
        "method": h.method,
        "stages": list(h.stages),
        "extra": h.extra,
    }


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write a quantized denoiser to ``directory`` (created if needed); returns the folder."""
    directory = ensure_writable_dir(directory)
    save_state(model, directory / WEIGHTS_NAME)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(metadata(model), indent=2))
    logger.info("saved quantized %s to %s", type(model).__name__, directory)
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a questdiff checkpoint (no {CONFIG_NAME}); pass the folder written by questdiff.save / questdiff quantize")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err}); re-save the quantized model") from err
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; this questdiff reads "
            f"{FORMAT!r} version {FORMAT_VERSION}: re-quantize the model with this version"
        )
    return meta


def load(
    directory: str | Path,
    base: nn.Module,
    adapter: ModelAdapter | None = None,
) -> nn.Module:
    """Restore a quantized denoiser onto ``base`` (a fresh copy of the FP model it was made from), in place.

    Raises ``ValueError`` if the checkpoint belongs to another base model or config version, or its weights file
    is truncated/corrupt.
    """
    meta = read_metadata(directory)
    found = fingerprint(base)
    if meta["base_fingerprint"] != found:
        raise ValueError(
            f"checkpoint {directory} was made from another base model ({meta['base_class']} {meta['base_fingerprint']}, "
            f"got {type(base).__name__} {found}); load it onto the FP model it was quantized from"
        )
    if adapter is None and meta["adapter"].get("name") == "generic":
        raise ValueError(
            f"checkpoint {directory} was made with a GenericAdapter: pass the same adapter, e.g. "
            f"adapter=GenericAdapter(timestep_argument={meta['adapter'].get('timestep_argument')!r}, ...)"
        )
    restore = getattr(adapter, "restore", None)
    if restore is not None:  # adapters that keep what they read from the model (GenericAdapter's trace)
        restore(meta["adapter"])
    config = QuantConfig.from_dict(meta["quant_config"])
    schedule = TimestepSchedule.from_dict(meta["schedule"])
    from .calibration.methods import rebuild_structure

    prepare(base, config, schedule, adapter)
    h = handle(base)
    h.method, h.stages, h.extra = meta["method"], list(meta["stages"]), dict(meta.get("extra", {}))
    rebuild_structure(base)
    load_state(base, Path(directory) / WEIGHTS_NAME)
    base.eval()
    return base
