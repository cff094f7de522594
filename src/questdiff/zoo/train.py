"""Training recipes of the zoo models; ``train(name, ...)`` writes ``OUT/model`` (a diffusers pipeline folder, or
``model.safetensors`` + ``config.json`` for a feature net) with ``train_info.json`` and a model card, plus
``OUT/checkpoints/<stage>.pt`` (resumable) and ``OUT/samples/*.png``.

Targets: the zoo names and ``fmnist-vae`` (the autoencoder alone, to share between the latent models via
``vae_dir``). Latent models train the autoencoder first unless ``vae_dir`` is given, then the UNet (or the DiT) on
latents scaled to unit variance (the ``scaling_factor`` of the autoencoder config).
"""
from __future__ import annotations

import datetime
import logging
import platform
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from diffusers.models.embeddings import LabelEmbedding
from safetensors.torch import save_file
from torch import nn

from ..eval.feature_net import FeatureNet
from . import architectures as arch
from .card import TRAIN_INFO_FILE, read_train_info, write_card, write_json
from .data import load_split, to_model_range, to_unit_range
from .evaluate import feature_net_accuracy, save_grid
from .pipelines import (
    ClassConditionalDiTPipeline,
    ClassConditionalLDMPipeline,
    ClassEmbedder,
    LatentDiffusionPipeline,
    PixelDiffusionPipeline,
)
from .registry import CLASS_CONDITIONAL_KINDS, CLASS_DIT, CLASS_LATENT, LATENT, PIXEL, get_spec
from .trainer import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)

VAE_TARGET = "fmnist-vae"
TARGETS = ("fmnist-ldm-cond", "fmnist-ldm", "mnist-ddpm", "fmnist-dit", "fmnist-features", "mnist-features", VAE_TARGET)
LABEL_DROPOUT = 0.1
KL_WEIGHT = 1e-6
MONITOR_SAMPLES, MONITOR_STEPS = 64, 50  # the periodic sample grids (tiny runs: 10 samples, 2 steps)

# Full-size settings for one H100; `time_budget_s` caps each stage's wall time (the schedule anneals by it).
DEFAULTS: dict[str, TrainConfig] = {
    VAE_TARGET: TrainConfig(steps=10000, batch_size=512, lr=1e-3, ema_decay=0.999),
    "fmnist-ldm": TrainConfig(steps=30000, batch_size=1024, lr=5e-4, ema_decay=0.999),
    "fmnist-ldm-cond": TrainConfig(steps=30000, batch_size=1024, lr=5e-4, ema_decay=0.999),
    "mnist-ddpm": TrainConfig(steps=30000, batch_size=1024, lr=4e-4, ema_decay=0.999),
    "fmnist-dit": TrainConfig(steps=40000, batch_size=1024, lr=5e-4, ema_decay=0.999),
    "fmnist-features": TrainConfig(steps=8000, batch_size=256, lr=2e-3, weight_decay=0.05, ema_decay=None),
    "mnist-features": TrainConfig(steps=4000, batch_size=256, lr=2e-3, weight_decay=0.05, ema_decay=None),
}


def _dataset(name: str) -> str:
    return "fashion-mnist" if name == VAE_TARGET else get_spec(name).dataset


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _stage_record(result: TrainResult) -> dict:
    return {"steps": result.steps, "seconds": round(result.seconds, 1), "final_loss": result.final_loss,
            "config": asdict(result.config)}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _batch(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Random indices ``[B]`` into ``data`` (sampled with replacement, on the data's device)."""
    return torch.randint(len(data), (batch_size,), device=data.device)


def _shift_and_flip(x: torch.Tensor, flip: bool, max_shift: int = 2) -> torch.Tensor:
    """Augmentation of ``[B, 1, 32, 32]``: random translation by up to ``max_shift`` pixels, optional h-flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device)[None, :, None] + dy
    cols = torch.arange(w, device=x.device)[None, None, :] + dx
    out = padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    if flip:
        out = torch.where(torch.rand(b, 1, 1, 1, device=x.device) < 0.5, out.flip(-1), out)
    return out


def _train_feature_net(name: str, ctx: _Context) -> dict:
    """Supervised FeatureNet training with shift (+ h-flip for Fashion-MNIST) augmentation."""
    images, labels = load_split(ctx.dataset, "train", ctx.data_dir)
    x, y = to_unit_range(images).to(ctx.device), labels.to(ctx.device)
    flip = ctx.dataset == "fashion-mnist"

    def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
        idx = _batch(x, ctx.config(name).batch_size)
        return F.cross_entropy(model(_shift_and_flip(x[idx], flip)), y[idx])

    result = Trainer(FeatureNet(), ctx.config(name), ctx.out, "classifier", ctx.device).fit(loss_fn, resume=ctx.resume)
    net = result.model.eval()
    accuracy = feature_net_accuracy(net, ctx.dataset, ctx.data_dir)
    log.info("%s: test accuracy %.4f", name, accuracy)
    model_dir = ctx.model_dir()
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, model_dir / "model.safetensors")
    write_json(model_dir / "config.json", {"num_classes": 10, "image_size": 32, "input_range": [0, 1],
                                           "dataset": ctx.dataset, "test_accuracy": accuracy})
    write_json(model_dir / "metrics.json", {"test_accuracy": accuracy})
    return {"stages": {"classifier": _stage_record(result)}, "params": {"model": _params(net)}}


@torch.no_grad()
def _latent_stats(vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``[N, 4, 8, 8]`` of images ``x`` ``[N, 1, 32, 32]`` in [-1, 1]."""
    means, stds = [], []
    for chunk in x.split(1000):
        dist = vae.encode(chunk.to(vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def _train_vae(ctx: _Context) -> tuple[AutoencoderKL, dict]:
    """L1 reconstruction + KL (weight 1e-6, as LDM's KL autoencoders) on pixels in [-1, 1]; sets ``scaling_factor``
    to 1 / std of the training latents."""
    images, _ = load_split("fashion-mnist", "train", ctx.data_dir)
    x = to_model_range(images).to(ctx.device)
    config = ctx.config(VAE_TARGET)

    def loss_fn(vae: nn.Module, step: int) -> torch.Tensor:
        batch = x[_batch(x, config.batch_size)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / batch[0].numel()
        return (recon.float() - batch).abs().mean() + KL_WEIGHT * kl

    def sample_fn(vae: nn.Module, step: int) -> None:
        with torch.no_grad():
            recon = vae.decode(vae.encode(x[:32]).latent_dist.mode()).sample
        pairs = torch.stack([x[:32], recon.float()], 1).flatten(0, 1)
        save_grid((pairs / 2 + 0.5).clamp(0, 1), ctx.out / "samples" / f"vae-{step:06d}.png", nrow=16)

    result = Trainer(arch.build_vae(ctx.tiny), config, ctx.out, "vae", ctx.device).fit(loss_fn, sample_fn, ctx.resume)
    vae = result.model
    mean, std = _latent_stats(vae, x[:10000])
    latents = mean + std * torch.randn_like(std)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    record = {**_stage_record(result), "test_psnr_db": _test_psnr(vae, ctx)}
    log.info("vae: scaling_factor %.4f, test PSNR %.2f dB", vae.config.scaling_factor, record["test_psnr_db"])
    return vae, {"vae": record}


@torch.no_grad()
def _test_psnr(vae: AutoencoderKL, ctx: _Context) -> float:
    """Mean reconstruction PSNR (dB, images in [0, 1]) of the autoencoder on the test split."""
    images, _ = load_split("fashion-mnist", "test", ctx.data_dir)
    psnrs = []
    for chunk in to_model_range(images).split(1000):
        chunk = chunk.to(ctx.device)
        recon = vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((recon - chunk) / 2).square().flatten(1).mean(1)
        psnrs.append(-10 * torch.log10(mse.clamp(min=1e-10)))
    return float(torch.cat(psnrs).mean())


def _load_vae(ctx: _Context) -> tuple[AutoencoderKL, dict]:
    """The autoencoder from ``vae_dir`` (with its training record), or a freshly trained one."""
    if ctx.vae_dir is None:
        vae, stages = _train_vae(ctx)
        vae.save_pretrained(ctx.out / "vae")
        return vae, stages
    vae = AutoencoderKL.from_pretrained(ctx.vae_dir, low_cpu_mem_usage=False).to(ctx.device)
    log.info("vae: loaded from %s (scaling_factor %.4f)", ctx.vae_dir, vae.config.scaling_factor)
    return vae, read_train_info(Path(ctx.vae_dir)).get("stages", {})


class _ConditionalDenoiser(nn.Module):
    """UNet + class embedder trained together: ``(x [N,4,8,8], t [N], labels [N]) -> eps [N,4,8,8]``."""

    def __init__(self, unet: nn.Module, class_embedder: ClassEmbedder) -> None:
        super().__init__()
        self.unet, self.class_embedder = unet, class_embedder

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.class_embedder(labels)).sample


def _drop_labels_once(dit: nn.Module) -> nn.Module:
    """diffusers' DiT embeds the class in every block, each with its own random label dropout in training mode:
    switch it off (the null row stays) so that the loss drops a sample's label in all blocks at once, as DiT does."""
    for module in dit.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return dit


def _noise_loss(scheduler: DDIMScheduler, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                x0: torch.Tensor) -> torch.Tensor:
    """DDPM epsilon-prediction MSE at uniformly drawn timesteps."""
    noise = torch.randn_like(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=x0.device)
    return F.mse_loss(predict(scheduler.add_noise(x0, noise, t), t).float(), noise)


def _train_diffusion(name: str, ctx: _Context) -> dict:
    """Trains the denoiser of ``name`` (and the autoencoder first for latent models) and saves the pipeline."""
    kind = get_spec(name).kind
    config = ctx.config(name)
    images, labels = load_split(ctx.dataset, "train", ctx.data_dir)
    x = to_model_range(images).to(ctx.device)
    y = labels.to(ctx.device)
    stages: dict = {}
    vae = None
    if kind == PIXEL:
        scheduler = arch.build_scheduler("ddpm")
        model: nn.Module = arch.build_pixel_unet(ctx.tiny)
    else:
        scheduler = arch.build_scheduler("ddpm" if kind == CLASS_DIT else "ldm")  # DiT: ADM's linear betas
        vae, stages = _load_vae(ctx)
        vae.eval().requires_grad_(False)
        mean, std = _latent_stats(vae, x)
        scale = vae.config.scaling_factor
        if kind == CLASS_DIT:
            model = _drop_labels_once(arch.build_dit(ctx.tiny))
        elif kind == CLASS_LATENT:
            model = _ConditionalDenoiser(arch.build_cond_unet(ctx.tiny), arch.build_class_embedder(ctx.tiny))
        else:
            model = arch.build_latent_unet(ctx.tiny)

    def clean(idx: torch.Tensor) -> torch.Tensor:
        if vae is None:
            return x[idx]
        return (mean[idx] + std[idx] * torch.randn_like(std[idx])) * scale

    def loss_fn(net: nn.Module, step: int) -> torch.Tensor:
        idx = _batch(x, config.batch_size)
        if kind in CLASS_CONDITIONAL_KINDS:
            drop = torch.rand(len(idx), device=idx.device) < LABEL_DROPOUT
            cls = torch.where(drop, torch.full_like(y[idx], arch.NUM_CLASSES), y[idx])
            if kind == CLASS_DIT:
                return _noise_loss(scheduler, lambda xt, t: net(xt, timestep=t, class_labels=cls).sample, clean(idx))
            return _noise_loss(scheduler, lambda xt, t: net(xt, t, cls), clean(idx))
        return _noise_loss(scheduler, lambda xt, t: net(xt, t).sample, clean(idx))

    def sample_fn(net: nn.Module, step: int) -> None:
        pipe = _pipeline(kind, net, vae, scheduler)
        pipe.set_progress_bar_config(disable=True)
        steps = min(pipe.config.default_num_inference_steps, 2 if ctx.tiny else MONITOR_STEPS)
        count = 10 if ctx.tiny else MONITOR_SAMPLES
        generator = torch.Generator(ctx.device).manual_seed(0)
        conditional = kind in CLASS_CONDITIONAL_KINDS
        kwargs = {"class_labels": torch.arange(count) % 10} if conditional else {"batch_size": count}
        images = pipe(num_inference_steps=steps, generator=generator, output_type="pt", **kwargs).images
        save_grid(images, ctx.out / "samples" / f"{name}-{step:06d}.png", nrow=10 if conditional else 8)

    stage = "transformer" if kind == CLASS_DIT else "unet"
    result = Trainer(model, config, ctx.out, stage, ctx.device).fit(loss_fn, sample_fn, ctx.resume)
    stages[stage] = _stage_record(result)
    pipe = _pipeline(kind, result.model, vae, scheduler)
    pipe.save_pretrained(ctx.model_dir())
    params = {k: _params(v) for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    return {"stages": stages, "params": params}


def _pipeline(kind: str, net: nn.Module, vae: AutoencoderKL | None, scheduler: DDIMScheduler) -> DiffusionPipeline:
    """The zoo pipeline of ``kind`` around a trained denoiser (defaults = the paper's sampler)."""
    if kind == PIXEL:
        return PixelDiffusionPipeline(unet=net, scheduler=scheduler)
    if kind == LATENT:
        return LatentDiffusionPipeline(vae=vae, unet=net, scheduler=scheduler)
    if kind == CLASS_DIT:
        return ClassConditionalDiTPipeline(vae=vae, transformer=net, scheduler=scheduler)
    return ClassConditionalLDMPipeline(vae=vae, unet=net.unet, class_embedder=net.class_embedder, scheduler=scheduler)


class _Context:
    """Options shared by the stages of one ``train`` call."""

    def __init__(self, name: str, out: Path, data_dir: str | None, device: torch.device, overrides: dict,
                 resume: bool, vae_dir: str | None, tiny: bool) -> None:
        self.name, self.out, self.data_dir, self.device = name, out, data_dir, device
        self.overrides, self.resume, self.vae_dir, self.tiny = overrides, resume, vae_dir, tiny
        self.dataset = _dataset(name)

    def config(self, target: str) -> TrainConfig:
        return DEFAULTS[target].updated(**self.overrides)

    def model_dir(self) -> Path:
        path = self.out / "model"
        path.mkdir(parents=True, exist_ok=True)
        return path


def train(
    name: str,
    out: str | Path,
    data_dir: str | None = None,
    device: str | torch.device | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    time_budget_s: float | None = None,
    resume: bool = False,
    vae_dir: str | None = None,
    tiny: bool = False,
) -> Path:
    """Trains zoo target ``name`` into ``out`` and returns the model folder ``out/model``.

    ``steps``/``batch_size``/``time_budget_s`` override every stage's defaults; ``tiny`` builds minimal
    architectures (tests, smoke runs); ``resume`` continues from ``out/checkpoints``.
    """
    if name not in TARGETS:
        raise ValueError(f"unknown training target {name!r}; valid targets: {', '.join(TARGETS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {"steps": steps, "batch_size": batch_size, "time_budget_s": time_budget_s}
    ctx = _Context(name, Path(out), data_dir, dev, overrides, resume, vae_dir, tiny)
    ctx.out.mkdir(parents=True, exist_ok=True)
    log.info("training %s on %s into %s", name, _hardware(dev), ctx.out)
    if name == VAE_TARGET:
        vae, stages = _train_vae(ctx)
        vae.save_pretrained(ctx.model_dir())
        record = {"stages": stages, "params": {"vae": _params(vae)}}
    elif get_spec(name).sampler is None:
        record = _train_feature_net(name, ctx)
    else:
        record = _train_diffusion(name, ctx)
    record.update(
        name=name, dataset=ctx.dataset, hardware=_hardware(dev), torch=torch.__version__,
        diffusers=diffusers.__version__, date=datetime.date.today().isoformat(), storage_dtype="float32",
        options={**overrides, "resume": resume, "vae_dir": vae_dir, "tiny": tiny, "device": str(dev)},
    )
    folder = ctx.model_dir()
    write_json(folder / TRAIN_INFO_FILE, record)
    if name != VAE_TARGET:
        write_card(name, folder)
    log.info("%s: saved to %s", name, folder)
    return folder
