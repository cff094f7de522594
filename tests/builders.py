"""Tiny random-config diffusers models and pipelines, built offline (no hub access) for CPU tests."""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from questdiff.config import W4A4, ActivationSpec

# W4A4 with input channels rotated in blocks of 8 (every tiny-model layer but conv_in divides): per-tensor 4-bit grids
ROTATED_W4A4 = W4A4.replace(activation=ActivationSpec(bits=4, rotation=8), name="W4A4-rot8")
# QuEST's own W4A4 grid: 4-bit activations per input channel (no GEMM applies it: deployed layers simulate it)
CHANNEL_W4A4 = W4A4.replace(activation=ActivationSpec(bits=4), name="W4A4-channel")
# W4A4 with SmoothQuant smoothing folded into the weights (per-tensor 4-bit grids), alone and before the rotation
SMOOTHED_W4A4 = W4A4.replace(activation=ActivationSpec(bits=4, smoothing=0.5), name="W4A4-smooth")
SMOOTHED_ROTATED_W4A4 = W4A4.replace(activation=ActivationSpec(bits=4, smoothing=0.5, rotation=8),
                                     name="W4A4-smooth-rot8")

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "shoe", "bag", "shirt", "small", "big"]


def tiny_unet2d(seed: int = 0) -> UNet2DModel:
    """Pixel-space UNet2DModel 1x16x16 with attention blocks and skip convs."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()


def tiny_cond_unet(seed: int = 0, cross_attention_dim: int = 32, **extra) -> UNet2DConditionModel:
    """UNet2DConditionModel 4x8x8 with self/cross attention transformer blocks."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8, **extra,
    ).eval()


def ddim_pipeline(seed: int = 0) -> DDIMPipeline:
    return DDIMPipeline(unet=tiny_unet2d(seed), scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False))


def tiny_tokenizer(tmp_path):
    """CLIP BPE tokenizer from a small word vocabulary written to ``tmp_path``."""
    from transformers import CLIPTokenizer
    import json

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    for w in WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    for w in WORDS:  # merge each word left to right
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16), len(vocab)


def _text_encoder(vocab_size: int, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8, sample_size=16,
    ).eval()


def tiny_sd_pipeline(tmp_path) -> StableDiffusionPipeline:
    """StableDiffusionPipeline at 16x16 pixels (8x8 latents) with random text encoder and UNet."""
    tokenizer, vocab_size = tiny_tokenizer(tmp_path)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=_text_encoder(vocab_size, 32), tokenizer=tokenizer, unet=tiny_cond_unet(),
        scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def tiny_sdxl_pipeline(tmp_path) -> StableDiffusionXLPipeline:
    """StableDiffusionXLPipeline with two random text encoders and added (text_time) conditioning."""
    tokenizer, vocab_size = tiny_tokenizer(tmp_path)
    unet = tiny_cond_unet(
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=_text_encoder(vocab_size, 32), text_encoder_2=_text_encoder(vocab_size, 32, True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000),
        force_zeros_for_empty_prompt=True,
    )


class CustomUNet(nn.Module):
    """A small non-diffusers denoiser whose timestep argument is called ``noise_level``."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32))
        self.inp = nn.Conv2d(1, channels, 3, padding=1)
        self.emb_proj = nn.Linear(32, channels)
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * channels, channels, 2, stride=2)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)

    def embed(self, noise_level: torch.Tensor) -> torch.Tensor:
        half = 8
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (torch.log(torch.tensor(1000.0)) / half))
        args = noise_level.float().reshape(-1, 1) * freqs
        return torch.cat([args.sin(), args.cos()], dim=1)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(self.embed(noise_level.expand(x.shape[0]) if noise_level.ndim == 0 else noise_level))
        h = torch.nn.functional.silu(self.inp(x) + self.emb_proj(emb)[:, :, None, None])
        d = torch.nn.functional.silu(self.mid(torch.nn.functional.silu(self.down(h))))
        u = self.fuse(torch.cat([self.up(d), h], dim=1))
        return self.out(torch.nn.functional.silu(u))


def custom_sampling_loop(model: nn.Module, n: int = 4, steps: int = 10, seed: int = 0) -> torch.Tensor:
    """A hand-written DDIM loop (no diffusers) calling ``model(x, noise_level=t)``."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(x, noise_level=t.expand(n))
            x = scheduler.step(eps, t, x).prev_sample
    return x


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(data_range**2 / mse)).item()


def scheduler_loop(unet, scheduler, steps: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Generic sampling loop for any diffusers scheduler (DDIMPipeline hard-codes DDIM's ``eta``)."""
    scheduler.set_timesteps(steps)
    x = torch.randn(n, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(seed))
    x = x * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(eps, t, x).prev_sample
    return x
