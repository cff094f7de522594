import pytest
import torch

from questdiff.zoo import data


def test_load_split_pads_to_32(idx_data):
    images, labels = data.load_split("fashion-mnist", "train", idx_data)
    assert images.shape == (48, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (48,) and labels.dtype == torch.int64
    assert images[:, :2].sum() == 0 and images[:, :, -2:].sum() == 0  # zero padding
    assert data.to_model_range(images).shape == (48, 1, 32, 32)
    assert data.to_unit_range(images).max() <= 1.0


def test_folder_holding_files_directly(idx_data):
    images, _ = data.load_split("mnist", "test", idx_data / "mnist")
    assert len(images) == 24


def test_env_var(idx_data, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(idx_data))
    assert data.find_dataset("mnist") == idx_data / "mnist"


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data"):
        data.load_split("fashion-mnist", "train", tmp_path)


def test_unknown_dataset_and_split(idx_data):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.find_dataset("cifar10", idx_data)
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split("mnist", "val", idx_data)
