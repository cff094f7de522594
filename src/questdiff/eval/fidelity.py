"""Fidelity of quantized samples to the full-precision samples of the same seeds: PSNR, SSIM, feature distance.

All three compare image ``i`` of one set with image ``i`` of the other and average the per-image values.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .feature_net import FeatureNet
from .features import feature_label, validate_images

FEATURE_BLOCKS = ("stem", "down1", "down2")  # 32x32, 16x16, 8x8 activations, like LPIPS' early VGG/Alex layers


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images, reference = validate_images(images, "images"), validate_images(reference, "reference")
    if images.shape != reference.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape; "
            "pass the samples of the same seeds, in the same order"
        )
    return images, reference


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (torchmetrics, ``data_range=1``): ``[N, 1, 32, 32]`` x2 -> ``[N]``.

    Identical images give ``inf``.
    """
    images, reference = _check_pair(images, reference)
    return peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics defaults: Gaussian window 11, sigma 1.5, ``data_range=1``) -> ``[N]``."""
    images, reference = _check_pair(images, reference)
    return structural_similarity_index_measure(images, reference, data_range=1.0, reduction="none")


def _block_activations(net: FeatureNet, images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of ``FEATURE_BLOCKS`` for ``images`` ``[B, 1, 32, 32]``: ``[B, C_l, H_l, W_l]`` each."""
    captured: list[torch.Tensor] = []
    handles = [
        getattr(net, name).register_forward_hook(lambda _m, _i, out: captured.append(out)) for name in FEATURE_BLOCKS
    ]
    try:
        net.features(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


@torch.no_grad()
def feature_distance(
    images: torch.Tensor,
    reference: torch.Tensor,
    net: FeatureNet,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """LPIPS-like distance on the feature network, without learned heads: ``[N, 1, 32, 32]`` x2 -> ``[N]``.

    For each block in ``FEATURE_BLOCKS`` the activations are unit-normalised along channels; the squared difference
    is summed over channels and averaged over positions (LPIPS with ``lpips=False``), then the blocks are averaged.
    0 for identical images, at most 4. ``net`` is put in eval mode on ``device`` (default: where it is).
    """
    images, reference = _check_pair(images, reference)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net.eval().to(device)
    out = []
    for start in range(0, images.shape[0], batch_size):
        pair = torch.cat([images[start:start + batch_size], reference[start:start + batch_size]]).to(device)
        per_block = []
        for act in _block_activations(net, pair):
            a, b = _unit_channels(act.double()).chunk(2)
            per_block.append((a - b).square().sum(dim=1).mean(dim=(1, 2)))
        out.append(torch.stack(per_block).mean(dim=0).cpu())
    return torch.cat(out)


def fidelity_metrics(
    images: torch.Tensor,
    reference: torch.Tensor,
    net: FeatureNet,
    name: str,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean PSNR, SSIM and feature distance of ``images`` against ``reference`` (both ``[N, 1, 32, 32]``).

    ``name`` is the feature network's zoo name; returns
    ``{"PSNR (dB)": ..., "SSIM": ..., "feature distance (FMNIST features)": ...}``.
    """
    return {
        "PSNR (dB)": float(psnr(images, reference).mean()),
        "SSIM": float(ssim(images, reference).mean()),
        f"feature distance ({feature_label(name)})": float(
            feature_distance(images, reference, net, batch_size, device).mean()
        ),
    }
