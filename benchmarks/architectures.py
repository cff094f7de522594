"""Real-scale denoiser architectures with random weights, for cost and speed measurements (speed does not depend on
the values): an LDM-4-architecture ``UNet2DModel`` and an SD-1.5-architecture ``UNet2DConditionModel``."""
from __future__ import annotations

from diffusers import UNet2DConditionModel, UNet2DModel


def build_ldm4(tiny: bool = False) -> UNet2DModel:
    """LDM-4 (LSUN-Bedrooms) UNet approximated with diffusers blocks; ``tiny`` shrinks channels and resolution."""
    channels = (16, 32, 32, 32) if tiny else (224, 448, 672, 896)
    return UNet2DModel(
        sample_size=16 if tiny else 64, in_channels=3, out_channels=3, layers_per_block=1 if tiny else 2,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8 if tiny else 32, norm_num_groups=8 if tiny else 32,
    )


def build_sd15(tiny: bool = False) -> UNet2DConditionModel:
    """SD-1.5 UNet (diffusers' default config, 768-dim context, 860M parameters); ``tiny`` shrinks it."""
    if not tiny:
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )
