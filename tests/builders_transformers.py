"""Tiny random-config diffusion transformers and their pipelines (DiT, PixArt-alpha, SD3.5, FLUX), built offline
for CPU tests. Text encoders are tiny random CLIP / T5 models with tokenizers built from a small word list."""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from builders import WORDS, _text_encoder, tiny_tokenizer

T5_DIM = 16
PROMPTS = ["a red shoe", "a photo of a cat"]


def tiny_dit(seed: int = 0, learned_sigma: bool = True, num_classes: int = 1000) -> DiTTransformer2DModel:
    """DiT (adaLN-Zero, patch 2) on 4x4x4 latents: 4 tokens, 2 blocks; DiTPipeline's null class is 1000."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8 if learned_sigma else 4,
        num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=num_classes,
    ).eval()


def tiny_latent_vae(shift_factor: float | None = None) -> AutoencoderKL:
    """RGB 8k x 8k <-> 4 x 4k x 4k latents (downsampling 2)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=8, shift_factor=shift_factor, scaling_factor=1.0,
    ).eval()


def tiny_dit_pipeline(seed: int = 0) -> DiTPipeline:
    return DiTPipeline(transformer=tiny_dit(seed), vae=tiny_latent_vae(), scheduler=DDIMScheduler(num_train_timesteps=1000))


def tiny_t5(tmp_path):
    """``(tokenizer, T5EncoderModel)``: a word-level tokenizer (``tokenizers``) and a 1-layer random T5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=8)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_pixart_pipeline(tmp_path) -> PixArtAlphaPipeline:
    """PixArt-alpha: self-attention + cross-attention to T5 tokens, one global adaLN (``adaln_single``)."""
    tokenizer, t5 = tiny_t5(tmp_path)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=4,
        patch_size=2, cross_attention_dim=16, caption_channels=T5_DIM,
    ).eval()
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=tiny_latent_vae(), transformer=transformer,
                               scheduler=DDIMScheduler(num_train_timesteps=1000))


def tiny_sd3_pipeline(tmp_path) -> StableDiffusion3Pipeline:
    """SD3.5-style MMDiT (joint attention, qk RMSNorm, a second self-attention in block 0), two CLIP encoders, no
    T5 (the pipeline feeds zeros), flow-matching Euler."""
    tokenizer, vocab_size = tiny_tokenizer(tmp_path)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=4, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_latent_vae(shift_factor=0.0),
        text_encoder=_text_encoder(vocab_size, 16, True), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(vocab_size, 16, True), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )


def tiny_flux_pipeline(tmp_path) -> FluxPipeline:
    """FLUX.1-dev-style: one double-stream and one single-stream block, rotary embeddings, guidance embedding."""
    tokenizer, vocab_size = tiny_tokenizer(tmp_path)
    tokenizer_2, t5 = tiny_t5(tmp_path)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_DIM, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_latent_vae(shift_factor=0.0),
        text_encoder=_text_encoder(vocab_size, 16), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
