"""Batched sampling with per-sample seeds: sample ``i`` uses ``torch.Generator().manual_seed(seed + i)`` (and class
``i % 10`` for class-conditional pipelines), so it does not depend on the batch size, and the FP and quantized
models see the same noise for the same ``i``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..pipelines import IMAGE_BAR_FORMAT, as_image_tensor, call_kwargs, is_class_conditional, step_progress


def class_labels(pipe: Any, num_images: int, num_classes: int = 10) -> torch.Tensor | None:
    """Labels ``[N]`` (``i % num_classes``) that ``generate`` gives a class-conditional ``pipe``; else ``None``."""
    return torch.arange(num_images) % num_classes if is_class_conditional(pipe) else None


def generate(
    pipe: Any,
    num_images: int,
    seed: int = 0,
    batch_size: int = 64,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    prompts: Sequence[str] | None = None,
    desc: str = "sampling",
    **extra: Any,
) -> torch.Tensor:
    """Sample ``num_images`` images from a diffusers-style pipeline in batches, with a progress bar that moves at
    every sampler step.

    ``None`` settings mean the pipeline's defaults. Class-conditional pipelines get class ``i % 10`` and
    text-conditioned ones ``prompts[i % len(prompts)]`` for sample ``i``; ``extra`` goes to every call as is.
    Returns ``[N, C, H, W]`` float32 in [0, 1] on the CPU (``[N, 1, 32, 32]`` for the zoo models). In a process
    group (``torchrun``) each rank samples a contiguous block of the batches and every rank returns all images,
    identical to one process's.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    chunks = []
    batches = distributed.sample_batches(num_images, batch_size)
    with tqdm(total=sum(count for _, count in batches), desc=desc, unit="img", bar_format=IMAGE_BAR_FORMAT,
              disable=not distributed.is_main()) as bar:
        for start, count in batches:
            kwargs = call_kwargs(
                pipe, start, count, seed,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta, prompts=prompts,
                output_type="pt", extra=extra,
            )
            with step_progress(pipe, bar, count):
                chunks.append(as_image_tensor(pipe(**kwargs).images))
    # every rank sampled a contiguous block of batches: in rank order they are the one-process images
    return torch.cat([chunk for part in distributed.gather(chunks) for chunk in part])
