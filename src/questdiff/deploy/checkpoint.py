"""Deployed checkpoints: ``deployed.safetensors`` (every tensor of the deployed model: integer codes, tables, the
layers left in floating point, non-persistent buffers too) + ``questdiff-deployed.json`` (versioned: model class
and config, timestep schedule, the layout of every deployed layer and attention processor, content digests).

``load_deployed`` rebuilds the model from that alone: no FP base weights are needed. diffusers models are rebuilt
from their class and config (on the meta device, then filled); other denoisers need a skeleton instance
(``model=``, any weights). Files are written atomically and verified on load.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import GenericAdapter, get_adapter
from ..config import QuantConfig
from ..devices import check_device
from ..folders import DEPLOYED_CONFIG, refuse_other_kind
from ..io_utils import atomic_path, atomic_write_text, ensure_writable_dir
from ..nn.rotation import ChannelRotation
from ..nn.smoothing import ChannelSmoothing
from ..nn.sdpa import SDPA_ATTR, install_sdpa_quantizers
from ..prepare import HANDLE_ATTR, QuantHandle, handle
from ..timestep import KEYS_ATTR, TimestepSchedule, TimestepState, install_device_timestep_hook
from .attention import OPERANDS, PROCESSORS, DeployedOperands
from .convert import DEPLOYED_KEY, fake_quant_leftovers, is_deployed
from .layers import Backend, DeployedConv, DeployedLayer, DeployedLinear
from .operand import ActTable, QuantizedOperand

logger = logging.getLogger(__name__)

FORMAT = "questdiff-deployed"
FORMAT_VERSION = 1
WEIGHTS_NAME = "deployed.safetensors"
CONFIG_NAME = DEPLOYED_CONFIG
_NONPERSISTENT = "__buffer__."  # prefix of non-persistent buffers in the weights file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to store: the state dict (shared storage stored once per key) and non-persistent buffers."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        out[key] = value.detach().clone().contiguous() if ptr in seen and value.numel() else value.detach().contiguous()
        seen.add(ptr)
    persistent = set(out)
    for name, buf in model.named_buffers():  # the TimestepKeys are rebuilt from the schedule in the json
        if name not in persistent and buf is not None and not name.startswith(KEYS_ATTR + "."):
            out[_NONPERSISTENT + name] = buf.detach().contiguous()
    return out


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    return None if config is None else json.loads(json.dumps(dict(config), default=list))


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was cast to: that of most of its floating-point parameters and deployed biases (the
    integer-grid tables stay fp32 whatever it is)."""
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtypes += [m.bias.dtype for m in model.modules() if isinstance(m, DeployedLayer) and m.bias is not None]
    return Counter(dtypes).most_common(1)[0][0] if dtypes else torch.float32


def save_deployed(model: nn.Module, directory: str | Path) -> Path:
    """Write a deployed denoiser (``convert``'s output) to ``directory``; returns the folder."""
    if not is_deployed(model):
        raise ValueError("save_deployed takes a converted model: run questdiff.convert(model) first "
                         "(questdiff.save stores fake-quant models)")
    kept = fake_quant_leftovers(model)
    if kept:
        raise ValueError(f"the model still has fake-quant modules that convert cannot pack yet ({', '.join(kept[:5])}); "
                         "save it with questdiff.save (fake-quant checkpoint) instead")
    h = handle(model)
    refuse_other_kind(directory, "deployed")
    directory = ensure_writable_dir(directory)
    weights = directory / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(_tensors(model), str(tmp))
    from .. import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "questdiff_version": __version__,
        "model_class": _class_path(model),
        "model_config": _model_config(model),
        "base_fingerprint": h.fingerprint,
        "timestep_argument": h.adapter.timestep_argument,
        "adapter": h.adapter.to_dict(),
        "quant_config": h.config.to_dict(),
        "schedule": h.schedule.to_dict(),
        "method": h.method,
        "backend": h.extra[DEPLOYED_KEY]["backend"],
        "dtype": str(_model_dtype(model)).removeprefix("torch."),
        "layers": {n: m.spec() for n, m in model.named_modules() if isinstance(m, DeployedLayer)},
        "attention": {n: m.processor.spec() for n, m in model.named_modules()
                      if isinstance(getattr(m, "processor", None), DeployedOperands)},
    }
    router = getattr(model, SDPA_ATTR, None)
    if router is not None:
        meta["sdpa"] = {"owners": router.owners, "sites": [site.spec() for site in router.sites]}
    meta["digests"] = {"weights_sha256": _sha256(weights), "config_sha256": _canonical(meta)}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2))
    logger.info("saved deployed %s to %s", type(model).__name__, directory)
    return directory


def is_deployed_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_NAME).is_file()


def read_deployed_metadata(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """The json of a deployed checkpoint; with ``verify`` its digests are checked against the files."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a deployed questdiff checkpoint (no {CONFIG_NAME}); pass a folder "
                                "written by questdiff.save_deployed / questdiff convert")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err}); convert and save the model again") from err
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; this "
                         f"questdiff reads {FORMAT!r} version {FORMAT_VERSION}: convert the model with this version")
    if verify:
        digests = meta.get("digests", {})
        body = {k: v for k, v in meta.items() if k != "digests"}
        if digests.get("config_sha256") != _canonical(body):
            raise ValueError(f"{path} was modified after it was written (config digest mismatch); convert and save "
                             "the model again instead of editing the file")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing; the deployed checkpoint folder is incomplete")
        if digests.get("weights_sha256") != _sha256(weights):
            raise ValueError(f"{weights} is corrupt or was modified (content digest mismatch); copy the checkpoint "
                             "again or re-run questdiff convert")
    return meta


def _skeleton(meta: dict[str, Any]) -> nn.Module:
    module_name, _, qualname = meta["model_class"].partition(":")
    try:
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the model class {meta['model_class']} of this checkpoint ({err}); pass "
                         "model=<an instance of it> to load_deployed") from err
    if meta.get("model_config") is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{meta['model_class']} cannot be rebuilt from a config; pass model=<an instance of it> "
                         "(its weights are not used) to load_deployed")
    with torch.device("meta"):
        return cls.from_config(meta["model_config"])


def _operand(spec: dict[str, Any], state: TimestepState) -> QuantizedOperand:
    return QuantizedOperand(rows=spec["rows"], act_channels=spec["act_channels"], act_range=tuple(spec["act_range"]),
                            out_channels=spec["out_channels"], taps=spec["taps"], channels=spec["channels"],
                            weight_bits=spec["weight_bits"], weight_groups=spec["weight_groups"],
                            weight_offset_used=spec["weight_offset_used"], state=state, fp8=spec.get("fp8", False))


def _layer(spec: dict[str, Any], state: TimestepState, backend: Backend) -> DeployedLayer:
    operands = [_operand(s, state) for s in spec["operands"]]
    out_channels = operands[0].weight.shape[0]
    rotation = spec.get("rotation")  # absent in checkpoints written before rotation existed
    smoothing = spec.get("smoothing")  # likewise; its scale comes with the state
    common = {"operands": operands, "split": spec["split"], "backend": backend,
              "bias": torch.empty(out_channels) if spec["has_bias"] else None,
              "rotation": None if rotation is None else ChannelRotation(**rotation),
              "smoothing": None if smoothing is None else ChannelSmoothing(**smoothing)}
    g = spec["geometry"]
    if spec["kind"] == "linear":
        return DeployedLinear(g["in_features"], g["out_features"], **common)
    return DeployedConv.from_geometry(g, **common)


def _attention(spec: dict[str, Any], state: TimestepState, backend: Backend) -> DeployedOperands:
    """An empty deployed attention of ``spec``'s flavour (``kind``: absent in checkpoints written when diffusers
    ``Attention`` was the only deployed flavour)."""
    tables = {name: ActTable(t["rows"], t["channels"], tuple(t["code_range"]), state, t.get("fp8", False))
              for name, t in spec["tables"].items() if name in OPERANDS}
    return PROCESSORS[spec.get("kind", "attn")](tables, spec["probs_max"], backend)


def load_deployed(directory: str | Path, model: nn.Module | None = None, *, device: str | torch.device = "cpu",
                  backend: Backend | None = None, verify: bool = True) -> nn.Module:
    """Rebuild a deployed denoiser from ``directory`` (no FP base weights needed) on ``device``.

    Args:
        model: a skeleton of the denoiser's class (any weights; meta tensors are fine). Only needed for classes
            that cannot be rebuilt from a config (non-diffusers denoisers).
        backend: override the kernels backend saved with the model (``"auto"`` / ``"triton"`` / ``"reference"``).
        verify: check the content digests of both files first (a corrupt or edited file raises ``ValueError``).
    """
    directory = Path(directory)
    device = check_device(device)
    meta = read_deployed_metadata(directory, verify)
    backend = backend or meta["backend"]
    model = model if model is not None else _skeleton(meta)
    if _class_path(model) != meta["model_class"]:
        raise ValueError(f"checkpoint {directory} holds a {meta['model_class']}, got a {_class_path(model)} skeleton")
    schedule = TimestepSchedule.from_dict(meta["schedule"])
    state = TimestepState(schedule)
    for name, spec in meta["layers"].items():
        model.set_submodule(name, _layer(spec, state, backend))
    for name, spec in meta["attention"].items():
        model.get_submodule(name).set_processor(_attention(spec, state, backend))
    if "sdpa" in meta:  # intercepted SDPA calls: the same routing, deployed sites
        sites = [_attention(spec, state, backend) for spec in meta["sdpa"]["sites"]]
        install_sdpa_quantizers(model, meta["sdpa"]["owners"], sites, meta["attention"])
    model.to(getattr(torch, meta.get("dtype", "float32")))  # the saved model's dtype (the tables stay fp32)
    model.to_empty(device=device)
    try:
        tensors = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{directory / WEIGHTS_NAME} is truncated or corrupt ({err}); convert and save again") from err
    buffers = {k[len(_NONPERSISTENT):]: v for k, v in tensors.items() if k.startswith(_NONPERSISTENT)}
    state_dict = {k: v for k, v in tensors.items() if not k.startswith(_NONPERSISTENT)}
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{directory} does not match its model (missing {result.missing_keys[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}); was it written by another questdiff version?")
    with torch.no_grad():
        for name, value in buffers.items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[leaf] = value
    adapter_info = meta["adapter"]
    try:
        adapter = get_adapter(model)
    except ValueError:
        adapter = GenericAdapter(meta["timestep_argument"])
    if adapter.to_dict() != adapter_info and adapter_info.get("name") != "generic":
        raise ValueError(f"checkpoint {directory} was made with adapter {adapter_info}, this model's is {adapter.to_dict()}")
    hook = install_device_timestep_hook(model, meta["timestep_argument"], HANDLE_ATTR, schedule)
    h = QuantHandle(QuantConfig.from_dict(meta["quant_config"]), schedule, state, adapter, {}, meta["base_fingerprint"],
                    hook, method=meta["method"], extra={DEPLOYED_KEY: {"backend": backend}})
    setattr(model, HANDLE_ATTR, h)
    return model.eval()
