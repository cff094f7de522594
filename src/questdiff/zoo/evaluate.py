"""Quality of zoo models against the test set: "FID (<dataset> features)" with the project's FeatureNet, classifier
accuracy of class-conditional samples, autoencoder reconstruction quality, and sample grids.

These are the numbers written into each model's ``metrics.json``; the full metric suite lives in ``questdiff.eval``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from torch import nn

from ..eval.accuracy import class_accuracy
from ..eval.features import FeatureSet, extract_features
from ..eval.generative import frechet_distance
from ..eval.report import save_grid
from .card import write_card, write_json
from .data import load_split, to_model_range, to_unit_range
from .loading import load_feature_net_from, load_pipeline
from .registry import CLASS_CONDITIONAL_KINDS, FEATURES, METRICS_FILE, SPECS, get_spec, read_metrics, weights_dir

log = logging.getLogger(__name__)


def _features(net: nn.Module, images: torch.Tensor, dataset: str) -> FeatureSet:
    """``questdiff.eval`` features of images ``[N, 1, 32, 32]`` in [0, 1], labelled by the dataset's feature net."""
    name = next(n for n, spec in SPECS.items() if spec.kind == FEATURES and spec.dataset == dataset)
    return extract_features(net, images, name, batch_size=1000)


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline, num_samples: int, batch_size: int, seed: int, class_conditional: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``num_samples`` images ``[N, 1, 32, 32]`` in [0, 1] (CPU) with the pipeline defaults; for a class-conditional
    pipeline also the labels ``[N]`` (cycling 0..9)."""
    images, labels = [], []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        generator = torch.Generator(pipe.device).manual_seed(seed + start)
        kwargs: dict = {"output_type": "pt", "generator": generator}
        if class_conditional:
            batch_labels = torch.arange(start, start + n) % 10
            labels.append(batch_labels)
            kwargs["class_labels"] = batch_labels
        else:
            kwargs["batch_size"] = n
        images.append(pipe(**kwargs).images.cpu())
    return torch.cat(images), (torch.cat(labels) if class_conditional else None)


def evaluate_pipeline(
    pipe: DiffusionPipeline,
    kind: str,
    dataset: str,
    feature_net: nn.Module,
    data_dir: str | None = None,
    num_samples: int = 10000,
    batch_size: int = 1000,
    seed: int = 0,
) -> tuple[dict, torch.Tensor]:
    """FID (feature net) of ``num_samples`` pipeline samples vs the test set, plus a train-vs-test floor and, for a
    class-conditional pipeline, the classifier's accuracy per class on its samples. Returns the metrics and the
    samples ``[N, 1, 32, 32]``."""
    test_images, _ = load_split(dataset, "test", data_dir)
    train_images, _ = load_split(dataset, "train", data_dir)
    test = _features(feature_net, to_unit_range(test_images), dataset)
    floor = _features(feature_net, to_unit_range(train_images[: len(test_images)]), dataset)
    conditional = kind in CLASS_CONDITIONAL_KINDS
    samples, labels = generate(pipe, num_samples, batch_size, seed, conditional)
    feats = _features(feature_net, samples, dataset)
    metrics = {
        "fid": frechet_distance(feats, test),
        "fid_train_vs_test": frechet_distance(floor, test),
        "num_samples": num_samples,
        "reference": f"{dataset} test split ({len(test_images)} images)",
        "seed": seed,
        "sampler": {k: v for k, v in pipe.config.items() if k.startswith("default_")},
        "scheduler": type(pipe.scheduler).__name__,
    }
    if conditional:
        accuracy = class_accuracy(feats, labels)
        metrics["class_accuracy"] = {"per_class": accuracy[f"per-class accuracy ({feats.label})"],
                                     "mean": accuracy[f"class accuracy ({feats.label})"]}
    log.info("%s samples: FID %.2f (train-vs-test floor %.2f)", kind, metrics["fid"], metrics["fid_train_vs_test"])
    return metrics, samples


@torch.no_grad()
def evaluate_autoencoder(vae: AutoencoderKL, feature_net: nn.Module, dataset: str, data_dir: str | None = None) -> dict:
    """Reconstruction PSNR (dB, [0, 1] range) and FID of reconstructions vs originals on the test set."""
    images, _ = load_split(dataset, "test", data_dir)
    device = vae.device
    recons = []
    for chunk in images.split(1000):
        x = to_model_range(chunk).to(device, vae.dtype)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        recons.append((recon.float() / 2 + 0.5).clamp(0, 1).cpu())
    recon = torch.cat(recons)
    original = to_unit_range(images)
    mse = (recon - original).square().flatten(1).mean(1)
    feats = _features(feature_net, recon, dataset), _features(feature_net, original, dataset)
    return {"recon_psnr_db": float((-10 * torch.log10(mse.clamp(min=1e-10))).mean()),
            "recon_fid": frechet_distance(*feats)}


@torch.no_grad()
def feature_net_accuracy(net: nn.Module, dataset: str, data_dir: str | None = None) -> float:
    """Top-1 accuracy of ``net`` on the test split."""
    images, labels = load_split(dataset, "test", data_dir)
    logits = _features(net, to_unit_range(images), dataset).logits
    return float((logits.argmax(1) == labels).float().mean())


def evaluate_folder(
    name: str,
    folder: str | Path,
    data_dir: str | None = None,
    features_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    num_samples: int = 10000,
    batch_size: int = 1000,
    seed: int = 0,
    grid: str | Path | None = None,
) -> dict:
    """Evaluates the saved zoo model ``name`` in ``folder``, merges the numbers into its ``metrics.json``, rewrites
    its model card and, with ``grid``, saves a 10x10 grid of the first samples (class-conditional: one class per
    column). ``features_dir`` defaults to the shipped feature net of the model's dataset."""
    spec, folder = get_spec(name), Path(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.kind == FEATURES:
        net = load_feature_net_from(folder, device)
        metrics: dict = {"test_accuracy": feature_net_accuracy(net, spec.dataset, data_dir)}
    else:
        net = load_feature_net_from(features_dir or weights_dir(spec.feature_net), device)
        pipe = load_pipeline(folder, spec.kind, device)
        pipe.set_progress_bar_config(disable=True)
        metrics, samples = evaluate_pipeline(pipe, spec.kind, spec.dataset, net, data_dir, num_samples, batch_size,
                                             seed)
        metrics["feature_net"] = spec.feature_net
        if hasattr(pipe, "vae"):
            metrics["vae"] = evaluate_autoencoder(pipe.vae, net, spec.dataset, data_dir)
        if grid is not None:
            save_grid(samples[:100], grid, nrow=10)
    write_json(folder / METRICS_FILE, {**read_metrics(folder), **metrics})
    write_card(name, folder)
    return metrics
