"""The standard metrics, Inception-v3 FID and CLIP score, with weights the user supplies as local files.

No Inception or CLIP weights can be downloaded here (see the asset manifest), so nothing in this module fetches
anything: FID uses pytorch-fid's Inception network with a local ``pt_inception-2015-12-05-*.pth`` state dict, and
CLIP score uses a local folder written by ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from unittest import mock

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
INCEPTION_DIM = 2048
INCEPTION_LABEL = "FID (Inception-v3)"
CLIP_LABEL = "CLIP score"


def _pytorch_fid() -> ModuleType:
    try:
        from pytorch_fid import inception
    except (ImportError, RuntimeError, OSError) as err:  # a torchvision built for another torch fails at import
        raise ImportError(
            f"Inception-v3 FID needs pytorch-fid and a torchvision that matches your torch ({err}); "
            "pip install pytorch-fid (with torchvision from the same index as torch)"
        ) from err
    return inception


def _standard_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """``[N, C, H, W]`` (C = 1 or 3) float in [0, 1] or uint8 -> ``[N, 3, H, W]`` float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            f"{name} must be [N, 1 or 3, H, W] float in [0, 1] or uint8, got shape {tuple(images.shape)}; "
            "add the channel axis with x.unsqueeze(1)"
        )
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point() or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"{name} must be float in [0, 1] or uint8 in [0, 255]; divide by 255 or map [-1, 1] with (x + 1) / 2"
        )
    return images.float().expand(-1, 3, -1, -1)


def fid_inception_v3(weights: str | os.PathLike[str] | None) -> nn.Module:
    """pytorch-fid's FID Inception-v3 (torchvision ``Inception3``, 1008 classes, TF-compatible blocks).

    The same network as ``pytorch_fid.inception.fid_inception_v3`` but loaded from the local file ``weights``
    (a ``pt_inception-2015-12-05-*.pth`` state dict) instead of downloaded; ``weights=None`` leaves it randomly
    initialised (tests, speed measurements).
    """
    inception = _pytorch_fid()
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = inception.FIDInceptionE_1(1280)
    net.Mixed_7c = inception.FIDInceptionE_2(2048)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {path} not found; download {INCEPTION_URL} on a machine with internet "
                "and pass its path"
            )
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError) as err:
            raise ValueError(
                f"{path} is not a pytorch-fid Inception state dict ({str(err).splitlines()[0]}); use {INCEPTION_FILE}"
            ) from err
    return net.eval()


class InceptionPool3(nn.Module):
    """pytorch-fid's ``InceptionV3`` pool3 features: ``[N, C, H, W]`` in [0, 1] -> ``[N, 2048]`` float64.

    pytorch-fid resizes to 299x299 (bilinear) and maps to [-1, 1]; grey images are repeated to 3 channels.
    ``network`` replaces pytorch-fid's network by any module with its interface (``[N, 3, H, W]`` in [0, 1] ->
    ``[pool3 [N, 2048, 1, 1]]``); the tests use a small random one where pytorch-fid is not installed.
    """

    num_features = INCEPTION_DIM

    def __init__(self, weights: str | os.PathLike[str] | None, *, network: nn.Module | None = None) -> None:
        super().__init__()
        if network is not None:
            self.model = network.eval()
            return
        inception = _pytorch_fid()
        net = fid_inception_v3(weights)
        with mock.patch.object(inception, "fid_inception_v3", return_value=net):  # its blocks, not its download
            self.model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_DIM]]).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_standard_images(images, "images"))[0].flatten(1).double()


@torch.no_grad()
def inception_fid(
    fakes: Mapping[str, torch.Tensor],
    real: torch.Tensor,
    weights: str | os.PathLike[str] | InceptionPool3,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """FID of each named image set in ``fakes`` against ``real``, with pytorch-fid's Inception-v3 pool3 features.

    Images: ``[N, C, H, W]`` (C = 1 or 3, any size) float in [0, 1] or uint8. ``weights``: a local
    ``pt_inception-2015-12-05-*.pth`` or an ``InceptionPool3`` built from one. The reference runs through the
    network once; statistics are float64 (torchmetrics). Comparable to published FIDs only at equal sample counts.
    """
    extractor = weights if isinstance(weights, InceptionPool3) else InceptionPool3(weights)
    for name, images in {"real": real, **fakes}.items():
        _standard_images(images, name)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False).to(device)
    for start in range(0, real.shape[0], batch_size):
        metric.update(real[start:start + batch_size].to(device), real=True)
    scores = {}
    for name, images in fakes.items():
        metric.reset()  # keeps the reference statistics
        for start in range(0, images.shape[0], batch_size):
            metric.update(images[start:start + batch_size].to(device), real=False)
        scores[name] = float(metric.compute())
    return scores


class _CLIPEmbeddings(nn.Module):
    """CLIPModel whose ``get_*_features`` return the projected ``[N, D]`` tensors torchmetrics expects.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (embeddings in ``pooler_output``) where transformers 4
    returned the tensor, which torchmetrics 1.9's CLIPScore cannot read.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: torch.Tensor | object) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(model_dir: str | os.PathLike[str]) -> tuple[nn.Module, object]:
    """``(model, processor)`` for torchmetrics' ``CLIPScore`` from a local ``save_pretrained`` folder, offline."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as err:
        raise ImportError("CLIP score needs transformers; pip install 'questdiff[text]'") from err
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no CLIP model in {path}; save one there with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained "
            "(e.g. openai/clip-vit-base-patch16, fetched on a machine with internet)"
        )
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    return _CLIPEmbeddings(model), CLIPProcessor.from_pretrained(path, local_files_only=True)


@torch.no_grad()
def clip_score(
    images: torch.Tensor,
    captions: Sequence[str],
    model_dir: str | os.PathLike[str],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> float:
    """torchmetrics CLIP score: ``max(100 * mean_i cos(image_i, caption_i), 0)``.

    ``images``: ``[N, C, H, W]`` (C = 1 or 3) float in [0, 1] or uint8; ``captions``: N strings; ``model_dir``: a
    local CLIP folder (see ``load_clip``).
    """
    images = _standard_images(images, "images")
    if len(captions) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(captions)} captions; pass one caption per image")
    model, processor = load_clip(model_dir)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor), sync_on_compute=False).to(device)
    as_uint8 = images.mul(255).round().to(torch.uint8)  # the CLIP processor rescales by 1/255 itself
    for start in range(0, as_uint8.shape[0], batch_size):
        metric.update(as_uint8[start:start + batch_size].to(device), list(captions[start:start + batch_size]))
    return float(metric.compute())
