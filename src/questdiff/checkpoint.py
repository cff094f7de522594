"""Save / load quantized denoisers: ``model.safetensors`` (the full state, so finetuned weights and every
quantizer row restore bit-exactly) + ``questdiff.json`` (versioned config, schedule, adapter, method, base-model
fingerprint, and sha256 digests of the weights file and of its own content). No pickle. Files are written
atomically, so a crash never leaves a half-written checkpoint; ``load`` verifies both digests, so a corrupted or
hand-edited checkpoint is refused instead of sampling garbage.
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

from .adapters import ModelAdapter, get_adapter
from .config import QuantConfig
from .digest import file_digest, json_digest
from .folders import FAKE_QUANT_CONFIG, refuse_other_kind
from .io_utils import atomic_path, ensure_writable_dir
from .prepare import DEPLOYED_KEY, fingerprint, handle, prepare
from .timestep import TimestepSchedule

logger = logging.getLogger(__name__)

FORMAT = "questdiff"
FORMAT_VERSION = 2  # 2 added "digests"; version 1 checkpoints still load, unverified, with a warning
READABLE_VERSIONS = (1, 2)
DIGESTS = "digests"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = FAKE_QUANT_CONFIG


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
    try:
        result = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = str(err).strip().splitlines()[1].strip() if "\n" in str(err).strip() else str(err)
        raise ValueError(
            f"checkpoint {path} does not match the model ({detail}); load it onto the base model it was made from, "
            "with the adapter it was quantized with"
        ) from err
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


def _content(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of ``questdiff.json`` its config digest covers: everything but the digests."""
    return {k: v for k, v in meta.items() if k != DIGESTS}


def _digests(meta: dict[str, Any]) -> dict[str, Any]:
    digests = meta.get(DIGESTS)
    return digests if isinstance(digests, dict) else {}


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write a quantized denoiser to ``directory`` (created if needed); returns the folder.

    Everything is checked before anything is written, and both files are written under temporary names and renamed
    only once both are complete, so a refused or failed save leaves the checkpoint that was there intact."""
    h = handle(model)  # raises for a model that is not quantized
    if DEPLOYED_KEY in h.extra:
        raise ValueError("the model is deployed (questdiff.convert): save it with questdiff.save_deployed; "
                         "questdiff.save stores fake-quant models")
    meta = json.loads(json.dumps(metadata(model)))  # the digest covers exactly what a reader gets back
    refuse_other_kind(directory, "fake-quant")
    directory = ensure_writable_dir(directory)
    with atomic_path(directory / WEIGHTS_NAME) as weights, atomic_path(directory / CONFIG_NAME) as config:
        save_file(_state(model), str(weights))
        meta[DIGESTS] = {"weights": file_digest(weights), "config": json_digest(meta)}
        config.write_text(json.dumps(meta, indent=2))
    logger.info("saved quantized %s to %s", type(model).__name__, directory)
    return directory


# what ``load`` reads from questdiff.json
REQUIRED_KEYS = ("base_fingerprint", "adapter", "quant_config", "schedule", "method", "stages")


def read_metadata(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a questdiff checkpoint (no {CONFIG_NAME}); pass the folder written by questdiff.save / questdiff quantize")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err}); re-save the quantized model") from err
    if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; this questdiff reads "
            f"{FORMAT!r} versions {list(READABLE_VERSIONS)}: re-quantize the model with this version"
        )
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path} misses the entries {', '.join(missing)} (edited by hand or written by another "
                         "questdiff version); quantize the model again")
    if meta["format_version"] == 1:
        logger.warning("%s predates content digests: its files cannot be verified; re-save it to add them", path)
    elif json_digest(_content(meta)) != _digests(meta).get("config") or "weights" not in _digests(meta):
        raise ValueError(
            f"{path} was edited or corrupted after saving (its content does not match its digest); restore the file "
            "questdiff.save wrote, or re-save / re-quantize the model"
        )
    return meta


def _verify_weights(directory: Path, meta: dict[str, Any]) -> None:
    path = directory / WEIGHTS_NAME
    expected = _digests(meta).get("weights")
    if expected is None or not path.is_file():  # version 1 (warned), or missing (load_state names it)
        return
    found = file_digest(path)
    if found != expected:
        raise ValueError(
            f"{path} is truncated or corrupt, or was changed after saving ({found[:19]}... does not match "
            f"{expected[:19]}... in {CONFIG_NAME}); re-save or re-quantize the model"
        )


def load(
    directory: str | Path,
    base: nn.Module,
    adapter: ModelAdapter | None = None,
) -> nn.Module:
    """Restore a quantized denoiser onto ``base`` (a fresh copy of the FP model it was made from), in place.

    Raises ``ValueError`` if the checkpoint belongs to another base model, adapter or config version, or a file
    does not match its saved digest (truncated, corrupt or edited).
    """
    meta = read_metadata(directory)
    _verify_weights(Path(directory), meta)
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
    adapter = adapter or get_adapter(base)
    restore = getattr(adapter, "restore", None)
    if restore is not None:  # adapters that keep what they read from the model (GenericAdapter's trace)
        restore(meta["adapter"])
    given = json.loads(json.dumps(adapter.to_dict()))
    if given != meta["adapter"]:
        raise ValueError(
            f"checkpoint {directory} was made with adapter {meta['adapter']} but load got {given}; pass the adapter "
            "it was quantized with"
        )
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
