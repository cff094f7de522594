"""The shipped zoo models load on CPU and sample correctly; API errors are clear."""
import shutil

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from questdiff import zoo
from questdiff.pipelines import is_class_conditional
from questdiff.zoo.registry import DIFFUSION_KINDS, SPECS, WEIGHTS_ROOT, is_shipped, shared_components

from builders import psnr

PIPELINES = [n for n, s in SPECS.items() if s.kind in DIFFUSION_KINDS]
FEATURE_NETS = [n for n, s in SPECS.items() if s.kind not in DIFFUSION_KINDS]


def _needs(name: str) -> None:
    if not is_shipped(name):
        pytest.skip(f"weights of {name} are not shipped in {zoo.weights_dir(name)}")


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(name):
        _needs(name)
        if name not in cache:
            cache[name] = zoo.load(name)
            cache[name].set_progress_bar_config(disable=True)
        return cache[name]

    return get


def _check_images(images: torch.Tensor, n: int) -> None:
    assert images.shape == (n, 1, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not constant


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_samples(pipes, name):
    pipe = pipes(name)
    spec = SPECS[name]
    assert pipe.config.default_num_inference_steps == spec.sampler.num_inference_steps
    assert pipe.config.default_eta == spec.sampler.eta
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    _check_images(images.images, 2)
    assert len(pipe(batch_size=2, num_inference_steps=2, output_type="pil").images) == 2
    assert pipe(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 32, 32, 1)


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_swapped_scheduler_samples_the_same_images(pipes, scheduler_cls):
    """Deterministic samplers from the same noise land on nearly the same images as DDIM. Measured on the default
    model at 10 steps: DPM-Solver++ 32.9 dB, Euler 39.4 dB; Euler with its noise scaled by ``init_noise_sigma``
    before ``set_timesteps`` (the old zoo loop): 6.7 dB, or 19.9 dB after a run with another step count."""
    pipe = pipes(zoo.DEFAULT_MODEL)
    kwargs = {"class_labels": [0, 5, 7]} if is_class_conditional(pipe) else {"batch_size": 3}

    def sample(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe(num_inference_steps=steps, generator=generator, output_type="pt", **kwargs).images

    reference = sample(10)
    original = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(original.config)
    try:
        sample(3)  # a run with another step count must not leak into the next
        images = sample(10)
    finally:
        pipe.scheduler = original
    _check_images(images, 3)
    assert psnr(reference, images) > 28.0


def test_class_labels_and_guidance(pipes):
    pipe = pipes("fmnist-ldm-cond")
    assert pipe.config.default_guidance_scale == 3.0
    net = zoo.load_feature_net("fmnist-features")
    labels = [1, 7]  # trouser, sneaker: easy classes
    generator = torch.Generator().manual_seed(0)
    images = pipe(class_labels=labels, num_inference_steps=8, generator=generator, output_type="pt").images
    assert net(images).argmax(1).tolist() == labels
    kwargs = {"class_labels": torch.tensor(labels), "num_inference_steps": 3, "output_type": "pt"}
    guided = pipe(generator=torch.Generator().manual_seed(1), guidance_scale=3.0, **kwargs).images
    plain = pipe(generator=torch.Generator().manual_seed(1), guidance_scale=1.0, **kwargs).images
    assert (guided - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class_labels must lie in"):
        pipe(class_labels=[10], num_inference_steps=1)
    with pytest.raises(ValueError, match="batch_size=3 but 2 class_labels"):
        pipe(batch_size=3, class_labels=labels, num_inference_steps=1)


@pytest.mark.parametrize("name", FEATURE_NETS)
def test_feature_net(name):
    _needs(name)
    net = zoo.load_feature_net(name)
    assert not net.training
    out = net.features(torch.rand(2, 1, 32, 32))
    assert out["pool"].shape == (2, 256) and out["logits"].shape == (2, 10)


def test_list_models_and_default():
    entries = {e.name: e for e in zoo.list_models()}
    assert list(entries) == list(SPECS) and zoo.DEFAULT_MODEL in entries
    assert zoo.has_default() == is_shipped(zoo.DEFAULT_MODEL)
    shipped = [e for e in entries.values() if e.shipped]
    assert all(e.size_bytes <= 10_000_000 and e.params > 0 for e in shipped)
    disk = sum(p.stat().st_size for p in WEIGHTS_ROOT.rglob("*") if p.is_file())  # shared components once
    assert disk <= 30_000_000
    for e in shipped:
        if e.kind in DIFFUSION_KINDS:
            assert e.fid is not None and e.fid_label.startswith("FID (")


def test_latent_models_share_one_autoencoder():
    shipped = [n for n in ("fmnist-ldm", "fmnist-ldm-cond", "fmnist-dit") if is_shipped(n)]
    if len(shipped) < 2:
        pytest.skip("fewer than two latent models are shipped")
    folders = {shared_components(zoo.weights_dir(n)).get("vae") for n in shipped}
    assert len(folders) == 1 and None not in folders  # one stored copy, referenced by every latent model
    assert not any((zoo.weights_dir(n) / "vae").exists() for n in shipped)
    vaes = [zoo.load(n).vae for n in shipped]
    assert all(torch.equal(a, b) for v in vaes[1:] for a, b in zip(vaes[0].state_dict().values(), v.state_dict().values()))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: fmnist-ldm-cond, fmnist-ldm, mnist-ddpm"):
        zoo.load("sd-1.5")
    with pytest.raises(ValueError, match="load_feature_net"):
        zoo.load("fmnist-features")
    with pytest.raises(ValueError, match="questdiff.zoo.load"):
        zoo.load_feature_net("mnist-ddpm")


def test_corrupt_weights_file_is_named(tmp_path):
    _needs("mnist-ddpm")
    folder = tmp_path / "mnist-ddpm"
    shutil.copytree(zoo.weights_dir("mnist-ddpm"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(zoo.ZooWeightsError, match=r"corrupt weights file .*unet.diffusion_pytorch_model\.safetensors"):
        zoo.load_pipeline(folder, "pixel-diffusion")
    weights.unlink()
    with pytest.raises(zoo.ZooWeightsError, match="missing weights file"):
        zoo.load_pipeline(folder, "pixel-diffusion")
