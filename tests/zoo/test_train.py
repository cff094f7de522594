"""Tiny end-to-end training runs on synthetic idx data: outputs load, resume works, export and eval run."""
import json
import logging

import pytest
import torch
from safetensors import safe_open

from questdiff import zoo
from questdiff.zoo.evaluate import evaluate_folder
from questdiff.zoo.export import export_model
from questdiff.zoo.loading import load_feature_net_from
from questdiff.zoo.train import train

TINY = {"steps": 2, "batch_size": 4, "tiny": True, "device": "cpu"}


@pytest.fixture(scope="module")
def features_dir(idx_data, tmp_path_factory):
    return train("mnist-features", tmp_path_factory.mktemp("features"), data_dir=idx_data, **TINY)


def test_feature_net_run(features_dir):
    loaded = load_feature_net_from(features_dir)
    assert not loaded.training
    assert json.loads((features_dir / "config.json").read_text())["num_classes"] == 10
    assert "test accuracy" in (features_dir / "README.md").read_text()


def test_ddpm_run_loads_resumes_exports_and_evaluates(idx_data, tmp_path, features_dir, caplog):
    out = tmp_path / "ddpm"
    folder = train("mnist-ddpm", out, data_dir=idx_data, **TINY)
    pipe = zoo.load_pipeline(folder, "pixel-diffusion")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 32, 32)
    assert (out / "checkpoints" / "unet.pt").is_file() and list((out / "samples").glob("*.png"))
    info = json.loads((folder / "train_info.json").read_text())
    assert info["stages"]["unet"]["steps"] == 2 and info["params"]["unet"] > 0

    with caplog.at_level(logging.INFO, logger="questdiff.zoo.trainer"):
        train("mnist-ddpm", out, data_dir=idx_data, resume=True, **{**TINY, "steps": 3})
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert torch.load(out / "checkpoints" / "unet.pt", weights_only=False)["step"] == 3

    shipped = export_model("mnist-ddpm", folder, tmp_path / "fp16")
    with safe_open(str(shipped / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    metrics = evaluate_folder("mnist-ddpm", shipped, data_dir=idx_data, features_dir=features_dir, device="cpu",
                              num_samples=8, batch_size=8, grid=tmp_path / "grid.png")
    assert torch.isfinite(torch.tensor(metrics["fid"])) and (tmp_path / "grid.png").is_file()
    assert "FID (MNIST features)" in (shipped / "README.md").read_text()


def test_conditional_ldm_run_with_given_vae(idx_data, tmp_path):
    vae_folder = train("fmnist-vae", tmp_path / "vae", data_dir=idx_data, **TINY)
    assert json.loads((vae_folder / "config.json").read_text())["scaling_factor"] != 1.0
    folder = train("fmnist-ldm-cond", tmp_path / "cond", data_dir=idx_data, vae_dir=str(vae_folder), **TINY)
    pipe = zoo.load_pipeline(folder, "class-conditional-ldm")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3, 4], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 32, 32)
    info = json.loads((folder / "train_info.json").read_text())
    assert set(info["stages"]) == {"vae", "unet"}  # the autoencoder's record is carried over


def test_unknown_target(tmp_path):
    with pytest.raises(ValueError, match="valid targets: fmnist-ldm-cond"):
        train("cifar-ddpm", tmp_path)
