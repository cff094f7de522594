"""Model and noise-schedule configurations of the zoo models (what they look like, not how they are trained).

Each builder returns a fresh, randomly initialised diffusers model. ``tiny=True`` gives a structurally identical
but minimal variant used by the tests and CPU smoke runs.

Shapes: images are ``[N, 1, 32, 32]`` in ``[-1, 1]`` inside the models; latents are ``[N, 4, 8, 8]``.
"""
from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

from .pipelines import ClassEmbedder

IMAGE_SIZE = 32
LATENT_SIZE = 8
LATENT_CHANNELS = 4
NUM_CLASSES = 10
CLASS_TOKEN_DIM = 128

# LDM's "linear" schedule (linspace of sqrt(beta)) is diffusers' "scaled_linear". LDM's DDIM uses
# alphas_cumprod[0] as the last "previous" alpha and timesteps 1, 1 + k, ... (steps_offset=1).
LDM_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
# DDPM (Ho et al.) CIFAR-10 schedule; the DDIM sampler of the QuEST/q-diffusion code ends at alpha=1, no clipping.
DDPM_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def build_vae(tiny: bool = False) -> AutoencoderKL:
    """KL autoencoder ``[N, 1, 32, 32] -> [N, 4, 8, 8]`` (downsampling factor 4, like LDM-4)."""
    channels = (32, 32, 32) if tiny else (32, 64, 64)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8 if tiny else 32,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )


def build_latent_unet(tiny: bool = False) -> UNet2DModel:
    """Unconditional latent denoiser ``[N, 4, 8, 8] -> [N, 4, 8, 8]``; attention at 4x4 and in the middle."""
    return UNet2DModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 32) if tiny else (64, 96),
        layers_per_block=1 if tiny else 2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16 if tiny else 32,
        norm_num_groups=8 if tiny else 32,
    )


def build_cond_unet(tiny: bool = False) -> UNet2DConditionModel:
    """Class-conditional latent denoiser: self- and cross-attention transformer blocks at 4x4 and in the middle.

    ``encoder_hidden_states`` is one class token ``[N, 1, CLASS_TOKEN_DIM]`` (see ``ClassEmbedder``).
    """
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 32) if tiny else (64, 96),
        layers_per_block=1 if tiny else 2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 if tiny else CLASS_TOKEN_DIM,
        attention_head_dim=16 if tiny else 32,
        norm_num_groups=8 if tiny else 32,
    )


def build_class_embedder(tiny: bool = False) -> ClassEmbedder:
    """10 class tokens plus the null token (index 10) for classifier-free guidance."""
    return ClassEmbedder(num_classes=NUM_CLASSES, embed_dim=32 if tiny else CLASS_TOKEN_DIM)


def build_dit(tiny: bool = False) -> DiTTransformer2DModel:
    """Class-conditional latent DiT ``[N, 4, 8, 8] -> [N, 4, 8, 8]`` (mirrors DiT-XL/2 at a small width and depth):
    patch 2 (16 tokens), adaLN-Zero blocks conditioned on timestep + class, 10 classes plus the null class 10 of
    classifier-free guidance, epsilon prediction (no learned sigma). Full size: width 128 (4 heads x 32), 8 blocks,
    2.8M parameters (5.6 MB in fp16)."""
    return DiTTransformer2DModel(
        num_attention_heads=2 if tiny else 4,
        attention_head_dim=16 if tiny else 32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2 if tiny else 8,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    )


def build_pixel_unet(tiny: bool = False) -> UNet2DModel:
    """Pixel-space denoiser ``[N, 1, 32, 32]``: 4 levels (32, 16, 8, 4), attention at 16x16 and in the middle,
    like the CIFAR-10 DDPM (channel multipliers 1, 2, 2, 2)."""
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 16, 16, 16) if tiny else (32, 64, 64, 64),
        layers_per_block=1 if tiny else 2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16 if tiny else 32,
        norm_num_groups=8 if tiny else 32,
    )


def build_scheduler(kind: str) -> DDIMScheduler:
    """``kind`` is ``"ldm"`` or ``"ddpm"``; the DDIM scheduler carries the training noise schedule too."""
    configs = {"ldm": LDM_SCHEDULER, "ddpm": DDPM_SCHEDULER}
    if kind not in configs:
        raise ValueError(f"unknown noise schedule {kind!r}; use one of {sorted(configs)}")
    return DDIMScheduler(**configs[kind])
