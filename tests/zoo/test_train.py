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


def test_dit_run_samples_exports_with_a_shared_vae_and_evaluates(idx_data, tmp_path, features_dir):
    vae_folder = train("fmnist-vae", tmp_path / "vae", data_dir=idx_data, **TINY)
    folder = train("fmnist-dit", tmp_path / "dit", data_dir=idx_data, vae_dir=str(vae_folder), **TINY)
    pipe = zoo.load_pipeline(folder, "class-conditional-dit")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel" and pipe.config.default_guidance_scale == 1.5
    kwargs = {"class_labels": [3, 4], "num_inference_steps": 2, "output_type": "pt"}
    guided = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe(generator=torch.Generator().manual_seed(0), guidance_scale=1.0, **kwargs).images
    assert guided.shape == (2, 1, 32, 32) and (guided - plain).abs().max() > 0
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 9\]"):
        pipe(class_labels=[10], num_inference_steps=1)
    info = json.loads((folder / "train_info.json").read_text())
    assert set(info["stages"]) == {"vae", "transformer"} and info["params"]["transformer"] > 0

    shared = tmp_path / "weights" / "_shared" / "fmnist-vae"
    first = export_model("fmnist-dit", folder, tmp_path / "weights" / "a", share={"vae": shared})
    second = export_model("fmnist-dit", folder, tmp_path / "weights" / "b", share={"vae": shared})
    for exported in (first, second):  # the autoencoder is stored once and referenced by both
        assert not (exported / "vae").exists()
        assert json.loads((exported / "shared_components.json").read_text()) == {"vae": "../_shared/fmnist-vae"}
    assert (shared / "diffusion_pytorch_model.safetensors").is_file()
    loaded = zoo.load_pipeline(second, "class-conditional-dit")
    for a, b in zip(loaded.vae.state_dict().values(), pipe.vae.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # fp16 storage of the same autoencoder
    metrics = evaluate_folder("fmnist-dit", second, data_dir=idx_data, features_dir=features_dir, device="cpu",
                              num_samples=10, batch_size=10)
    assert "class_accuracy" in metrics and torch.isfinite(torch.tensor(metrics["fid"]))


def test_sharing_refuses_a_different_component(idx_data, tmp_path):
    from questdiff.zoo.export import share_component

    vae_folder = train("fmnist-vae", tmp_path / "vae", data_dir=idx_data, **TINY)
    folder = train("fmnist-dit", tmp_path / "dit", data_dir=idx_data, vae_dir=str(vae_folder), **TINY)
    other = train("fmnist-vae", tmp_path / "vae2", data_dir=idx_data, **{**TINY, "steps": 3})
    with pytest.raises(ValueError, match=r"vae differs from the shared .*vae2.* \((config|weights)"):
        share_component(folder, "vae", other)
    assert (folder / "vae").is_dir() and not (folder / "shared_components.json").exists()


def test_dit_training_drops_a_label_in_every_block_at_once():
    from questdiff.zoo.architectures import build_dit
    from questdiff.zoo.train import _drop_labels_once

    dit = _drop_labels_once(build_dit(tiny=True)).train()
    x, t, labels = torch.randn(8, 4, 8, 8), torch.full((8,), 500), torch.arange(8)
    with torch.no_grad():  # diffusers' own per-block label dropout (random in training mode) is off
        assert torch.equal(dit(x, timestep=t, class_labels=labels).sample, dit(x, timestep=t, class_labels=labels).sample)
    assert all(block.norm1.emb.class_embedder.embedding_table.num_embeddings == 11 for block in dit.transformer_blocks)
