"""Fixtures of the zoo tests: synthetic Fashion-MNIST/MNIST-format idx files written to a temporary folder."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

SIZES = {"train": 48, "test": 24}
PREFIX = {"train": "train", "test": "t10k"}


def write_idx_dataset(folder: Path, sizes: dict[str, int] = SIZES, seed: int = 0) -> Path:
    """Writes the four idx .gz files: 28x28 uint8 images (a bright square whose place encodes the label)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 5)
            images[i, 4 + 10 * r: 12 + 10 * r, 2 + 5 * c: 8 + 5 * c] = 230
        header = np.array([2051, n, 28, 28], dtype=">i4").tobytes()
        with gzip.open(folder / f"{PREFIX[split]}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + images.tobytes())
        with gzip.open(folder / f"{PREFIX[split]}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes())
    return folder


@pytest.fixture(scope="session")
def idx_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with ``fashion-mnist/`` and ``mnist/`` subfolders of synthetic idx files."""
    root = tmp_path_factory.mktemp("idx-data")
    for name in ("fashion-mnist", "mnist"):
        write_idx_dataset(root / name)
    return root
