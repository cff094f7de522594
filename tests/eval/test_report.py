from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from questdiff.eval.report import PADDING, make_grid, save_grid, save_side_by_side, write_metrics_json


def test_metrics_json_round_trips_and_names_non_finite_values(tmp_path) -> None:
    path = write_metrics_json(tmp_path / "out" / "metrics.json", {"FID (FMNIST features)": 1.5, "PSNR (dB)": math.inf,
                                                                  "per-class": {0: torch.tensor(0.5)}})
    assert json.loads(path.read_text()) == {"FID (FMNIST features)": 1.5, "PSNR (dB)": "inf", "per-class": {"0": 0.5}}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_failed_metrics_write_keeps_the_previous_file(tmp_path) -> None:
    path = write_metrics_json(tmp_path / "metrics.json", {"a": 1})
    with pytest.raises(TypeError):
        write_metrics_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_grid_layout_and_png(tmp_path) -> None:
    images = torch.stack([torch.full((1, 4, 4), i / 10) for i in range(5)])
    grid = make_grid(images, nrow=3)
    assert grid.shape == (1, 2 * (4 + PADDING) + PADDING, 3 * (4 + PADDING) + PADDING)
    path = save_grid(images, tmp_path / "grid.png", nrow=3)
    png = np.asarray(Image.open(path))
    assert png.shape == grid.shape[1:] and png[PADDING, PADDING] == 0 and png[PADDING, 8] == round(0.1 * 255)
    assert png[8, 8] == round(0.4 * 255) and png[8, 14] == 0  # 5th image, then an empty slot
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_side_by_side_puts_each_quantized_sample_under_its_fp_twin(tmp_path) -> None:
    fp = torch.stack([torch.full((1, 4, 4), 0.2 + i / 100) for i in range(5)])
    q = torch.stack([torch.full((1, 4, 4), 0.6 + i / 100) for i in range(5)])
    png = np.asarray(Image.open(save_side_by_side(fp, q, tmp_path / "sbs.png", nrow=3)))
    step = 4 + PADDING
    assert png.shape == (4 * step + PADDING, 3 * step + PADDING)  # two bands of FP row + quantized row
    for i in range(5):
        band, col = divmod(i, 3)
        y, x = PADDING + 2 * band * step, PADDING + col * step
        assert png[y, x] == round((0.2 + i / 100) * 255) and png[y + step, x] == round((0.6 + i / 100) * 255)
    with pytest.raises(ValueError, match="same seeds"):
        save_side_by_side(fp, q[:4], tmp_path / "bad.png")
