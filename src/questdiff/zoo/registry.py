"""Names, specs and on-disk facts (parameters, size, measured quality) of the zoo models.

Static facts live in ``SPECS``; facts measured after training are read from the shipped files: parameter counts from
the safetensors headers, quality from ``metrics.json`` beside the weights.

A component shared by several models (the Fashion-MNIST autoencoder of the latent models) is stored once, under
``weights/_shared/``, and named in the pipeline folder's ``shared_components.json`` (component -> folder relative to
the pipeline folder) instead of a subfolder; ``load`` assembles the pipeline from both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
SHARED_DIR = WEIGHTS_ROOT / "_shared"
METRICS_FILE = "metrics.json"
SHARED_FILE = "shared_components.json"

PIXEL, LATENT, CLASS_LATENT, FEATURES = "pixel-diffusion", "latent-diffusion", "class-conditional-ldm", "feature-net"
CLASS_DIT = "class-conditional-dit"


@dataclass(frozen=True)
class SamplerDefaults:
    """The paper's sampler setting that the pipeline uses when a call leaves it out."""

    scheduler: str
    num_inference_steps: int
    eta: float
    guidance_scale: float | None = None


@dataclass(frozen=True)
class ZooSpec:
    """What a zoo model is: its kind, data, the paper setting it mirrors and its default sampler."""

    name: str
    kind: str
    dataset: str
    mirrors: str
    feature_net: str
    sampler: SamplerDefaults | None


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model as shipped: ``params``/``denoiser_params`` and ``size_bytes`` are 0 when its weights are absent
    (``size_bytes`` counts the shared components it uses too);
    ``fid`` is "FID (<feature net> features)" of samples vs the 10k test images (``None`` if not measured)."""

    name: str
    kind: str
    dataset: str
    mirrors: str
    sampler: SamplerDefaults | None
    shipped: bool
    params: int
    denoiser_params: int
    size_bytes: int
    fid: float | None
    fid_label: str
    metrics: dict


SPECS: dict[str, ZooSpec] = {
    s.name: s
    for s in (
        ZooSpec(
            "fmnist-ldm-cond", CLASS_LATENT, "fashion-mnist", "ImageNet LDM-4 (class-conditional, cross-attention, CFG)",
            "fmnist-features", SamplerDefaults("DDIM", 20, 0.0, 3.0),
        ),
        ZooSpec(
            "fmnist-ldm", LATENT, "fashion-mnist", "LSUN-Bedrooms LDM-4 (unconditional latent diffusion)",
            "fmnist-features", SamplerDefaults("DDIM", 200, 1.0),
        ),
        ZooSpec(
            "mnist-ddpm", PIXEL, "mnist", "CIFAR-10 DDPM (pixel space)", "mnist-features",
            SamplerDefaults("DDIM", 100, 0.0),
        ),
        ZooSpec(
            "fmnist-dit", CLASS_DIT, "fashion-mnist", "ImageNet DiT-XL/2 256 (class-conditional, adaLN-Zero, patch 2, CFG)",
            "fmnist-features", SamplerDefaults("DDIM", 20, 0.0, 1.5),
        ),
        ZooSpec("fmnist-features", FEATURES, "fashion-mnist", "Inception-v3 of FID/sFID/IS", "fmnist-features", None),
        ZooSpec("mnist-features", FEATURES, "mnist", "Inception-v3 of FID/sFID/IS", "mnist-features", None),
    )
}
DIFFUSION_KINDS = (PIXEL, LATENT, CLASS_LATENT, CLASS_DIT)
CLASS_CONDITIONAL_KINDS = (CLASS_LATENT, CLASS_DIT)


def get_spec(name: str) -> ZooSpec:
    """The spec of ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in SPECS:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(SPECS)}")
    return SPECS[name]


def weights_dir(name: str) -> Path:
    """Folder of the shipped weights of ``name`` (it may not exist when the weights are not shipped)."""
    return WEIGHTS_ROOT / get_spec(name).name


def shared_components(folder: Path) -> dict[str, Path]:
    """Component name -> the shared folder holding it, from ``folder/shared_components.json`` (empty if absent)."""
    path = Path(folder) / SHARED_FILE
    if not path.is_file():
        return {}
    return {name: (Path(folder) / rel).resolve() for name, rel in json.loads(path.read_text()).items()}


def weight_files(folder: Path) -> dict[str, list[Path]]:
    """Component name -> the files it needs (config + safetensors) in a pipeline or feature-net folder.

    Reads ``model_index.json`` for pipelines (shared components point into their shared folder); a folder without it
    is a feature net (``model.safetensors``). Raises ``FileNotFoundError`` naming the missing index file.
    """
    index = folder / "model_index.json"
    if not index.is_file():
        if (folder / "config.json").is_file():
            return {"model": [folder / "config.json", folder / "model.safetensors"]}
        raise FileNotFoundError(f"missing {index}; the folder is not a saved zoo model")
    files: dict[str, list[Path]] = {}
    shared = shared_components(folder)
    for key, value in json.loads(index.read_text()).items():
        if key.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = shared.get(key, folder / key)
        if value[1].endswith("Scheduler"):
            files[key] = [sub / "scheduler_config.json"]
        else:
            files[key] = [sub / "config.json", sub / "diffusion_pytorch_model.safetensors"]
    return files


def count_params(folder: Path) -> dict[str, int]:
    """Parameter count per component from the safetensors headers (no weights are read)."""
    counts: dict[str, int] = {}
    for component, paths in weight_files(folder).items():
        for path in paths:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    counts[component] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return counts


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def is_shipped(name: str) -> bool:
    """True iff every file that ``name`` needs is present (contents are not checked)."""
    try:
        return all(p.is_file() for paths in weight_files(weights_dir(name)).values() for p in paths)
    except FileNotFoundError:
        return False


def read_metrics(folder: Path) -> dict:
    """Contents of ``metrics.json`` in ``folder`` (empty when absent)."""
    path = folder / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def entry(name: str) -> ZooEntry:
    """The ``ZooEntry`` of ``name`` from its spec and shipped files."""
    spec, folder = get_spec(name), weights_dir(name)
    shipped = is_shipped(name)
    counts = count_params(folder) if shipped else {}
    metrics = read_metrics(folder)
    # on disk for this model: its folder and the shared components it uses
    folders = [folder, *shared_components(folder).values()] if shipped else []
    size = sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file())
    return ZooEntry(
        name=name,
        kind=spec.kind,
        dataset=spec.dataset,
        mirrors=spec.mirrors,
        sampler=spec.sampler,
        shipped=shipped,
        params=sum(counts.values()),
        denoiser_params=counts.get("unet", counts.get("transformer", counts.get("model", 0))),
        size_bytes=size,
        fid=metrics.get("fid"),
        fid_label=fid_label(spec.feature_net),
        metrics=metrics,
    )


def fid_label(feature_net: str) -> str:
    """"FID (FMNIST features)" for ``fmnist-features``, and so on."""
    return f"FID ({feature_net.split('-')[0].upper()} features)"
