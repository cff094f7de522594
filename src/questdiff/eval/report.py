"""Evaluation artifacts: ``metrics.json`` and PNG sample grids, each written atomically (temp file + rename).

Grids are built with torch and saved with PIL (torchvision's ``make_grid`` layout: 2-pixel black padding), so
the output is the same whether or not torchvision is installed.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..io_utils import atomic_path, atomic_write_text

PADDING = 2


def _json_safe(value: Any) -> Any:
    """Tensors -> numbers/lists; non-finite floats -> "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_metrics_json(path: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as indented JSON to ``path`` atomically; returns the path.

    Non-finite floats (e.g. the PSNR of identical images) are written as the strings ``"inf"``/``"nan"``.
    """
    text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def make_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Tile ``[N, C, H, W]`` images into ``[C, rows*(H+2)+2, nrow*(W+2)+2]``, ``nrow`` images per row."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = images.new_zeros(c, nrows * (h + PADDING) + PADDING, ncol * (w + PADDING) + PADDING)
    for i in range(n):
        y, x = divmod(i, ncol)
        top, left = PADDING + y * (h + PADDING), PADDING + x * (w + PADDING)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def _to_pil(grid: torch.Tensor) -> Image.Image:
    """``[C, H, W]`` float in [0, 1], C in {1, 3} -> PIL image (rounded like torchvision's ``save_image``)."""
    if grid.shape[0] not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got {grid.shape[0]}")
    array = grid.detach().float().cpu().clamp(0, 1).mul(255).add(0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def save_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int = 8) -> Path:
    """Save ``[N, C, H, W]`` images in [0, 1] (C = 1 or 3) as one PNG grid, ``nrow`` per row; returns the path."""
    image = _to_pil(make_grid(images, nrow))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def save_side_by_side(
    fp_images: torch.Tensor, q_images: torch.Tensor, path: str | os.PathLike[str], nrow: int = 8
) -> Path:
    """Save FP samples over quantized samples of the same seeds as one PNG; returns the path.

    ``fp_images``, ``q_images``: ``[N, C, H, W]`` in [0, 1]. Column ``j`` of each band holds seed ``j`` (FP on top,
    quantized below); bands of ``nrow`` seeds are stacked when N > nrow.
    """
    if fp_images.shape != q_images.shape:
        raise ValueError(
            f"fp_images {tuple(fp_images.shape)} and q_images {tuple(q_images.shape)} differ in shape; "
            "pass the samples of the same seeds"
        )
    ncol = min(nrow, fp_images.shape[0])
    tiles = []
    for start in range(0, fp_images.shape[0], ncol):
        fp, q = fp_images[start:start + ncol], q_images[start:start + ncol]
        fill = fp.new_zeros(ncol - fp.shape[0], *fp.shape[1:])  # keeps a short last band aligned: FP over Q
        tiles += [fp, fill, q, fill]
    return save_grid(torch.cat(tiles), path, nrow=ncol)


def _image_name(index: int) -> str:
    return f"{index:05d}.png"


def foreign_files(folder: str | os.PathLike[str]) -> list[str]:
    """Entries of an image folder that ``save_image_folder`` did not write (``save_image_folder`` refuses them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if not (p.is_file() and len(p.name) == 9 and p.name[:5].isdigit() and p.suffix == ".png"))


def save_image_folder(images: torch.Tensor, folder: str | os.PathLike[str]) -> int:
    """Save ``[N, C, H, W]`` images as ``folder/00000.png`` ... so that the folder holds exactly these images: those
    of an earlier call are replaced, never mixed in. The new images are written beside the folder first and swapped
    in once complete. Returns how many earlier images were replaced; raises ``ValueError`` if the folder holds files
    it did not write (they are not deleted)."""
    import shutil

    folder = Path(folder)
    foreign = foreign_files(folder)
    if foreign:
        raise ValueError(f"{folder} holds files that are not sampled images ({', '.join(foreign[:3])}); move them away")
    fresh = folder.parent / f".{folder.name}.new"
    if fresh.exists():  # left by a killed call
        shutil.rmtree(fresh)
    fresh.mkdir(parents=True)
    try:
        for i, image in enumerate(images):
            _to_pil(make_grid(image[None], 1)).save(fresh / _image_name(i), format="PNG")
        replaced = len(list(folder.iterdir())) if folder.is_dir() else 0
        if folder.is_dir():
            shutil.rmtree(folder)
        os.replace(fresh, folder)
    finally:
        if fresh.exists():
            shutil.rmtree(fresh)
    return replaced
