"""Fashion-MNIST / MNIST loading from the idx ``.gz`` files (never shipped in the repository).

Search order for a dataset folder: the ``data_dir`` argument, the ``QUESTDIFF_DATA`` environment variable,
``/usr/share/datasets/<name>/`` (Debian package ``dataset-fashion-mnist``), then ``../shared/assets/<name>/`` relative
to the working directory and to the repository. A given folder may hold the files itself or a ``<name>/`` subfolder.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("fashion-mnist", "mnist")
SPLITS = {"train": "train", "test": "t10k"}
ENV_VAR = "QUESTDIFF_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[3]


def _image_file(folder: Path, split: str) -> Path:
    return folder / f"{SPLITS[split]}-images-idx3-ubyte.gz"


def _label_file(folder: Path, split: str) -> Path:
    return folder / f"{SPLITS[split]}-labels-idx1-ubyte.gz"


def _candidates(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    elif os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    else:
        roots += [Path("/usr/share/datasets"), Path.cwd() / "../shared/assets", _REPO_ROOT / "../shared/assets"]
    folders: list[Path] = []
    for root in roots:
        folders += [root, root / name]
    return folders


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the four idx files of ``name`` (``"fashion-mnist"`` or ``"mnist"``).

    Raises ``FileNotFoundError`` listing where it looked and how to get the data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; use one of {DATASETS}")
    folders = _candidates(name, data_dir)
    for folder in folders:
        if all(f(folder, s).is_file() for s in SPLITS for f in (_image_file, _label_file)):
            return folder
    looked = ", ".join(str(f) for f in folders)
    raise FileNotFoundError(
        f"{name} idx files (train/t10k-images-idx3-ubyte.gz, ...) not found in: {looked}; "
        f"install them with `apt-get install dataset-fashion-mnist` (Fashion-MNIST) or pass --data DIR / set "
        f"{ENV_VAR}=DIR to a folder holding the files"
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_split(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 32, 32]`` uint8 (28x28 zero-padded by 2 pixels on each side) and labels ``[N]`` int64."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    folder = find_dataset(name, data_dir)
    images = _read_idx(_image_file(folder, split), 16).reshape(-1, 28, 28)
    labels = _read_idx(_label_file(folder, split), 8)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} {split} images but {len(labels)} labels; the files are corrupt")
    padded = F.pad(torch.from_numpy(images.copy()), (2, 2, 2, 2))
    return padded, torch.from_numpy(labels.astype(np.int64))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 32, 32]`` -> float ``[N, 1, 32, 32]`` in ``[-1, 1]`` (the diffusion models' range)."""
    return images.unsqueeze(1).float() / 127.5 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 32, 32]`` -> float ``[N, 1, 32, 32]`` in ``[0, 1]`` (the FeatureNet's and pipelines' range)."""
    return images.unsqueeze(1).float() / 255.0
