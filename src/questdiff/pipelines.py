"""Driving diffusers pipelines uniformly: find the denoiser, swap schedulers by name, and build call arguments
for unconditional (``batch_size``), class-conditional (``class_labels``) and text (``prompt``) pipelines.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from torch import nn

SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": False}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
}


def denoiser_of(pipe: Any) -> nn.Module:
    """The pipeline's denoiser (``unet`` or ``transformer``)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has no 'unet' or 'transformer' component to quantize")


def set_denoiser(pipe: Any, denoiser: nn.Module) -> None:
    name = "unet" if isinstance(getattr(pipe, "unet", None), nn.Module) else "transformer"
    setattr(pipe, name, denoiser)


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace the pipeline's scheduler by one of ``SCHEDULERS`` built from the current scheduler's config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)


def fit_scheduler(pipe: Any, steps: int | None) -> None:
    """Make the pipeline's scheduler able to run ``steps`` steps: where its ``steps_offset`` would push the first
    timestep past the last trained one (``leading`` spacing with the LDM setting ``steps_offset=1`` at ``steps ==
    num_train_timesteps``: timestep 1000 of 0..999, an IndexError in every sampler), the offset is lowered just
    enough (the full chain then runs 999..0). Any other step count keeps the configured timesteps; a count whose
    timesteps would repeat (DPM-Solver++'s leading spacing at 1000 steps gives 1, 1, ...) raises ``ValueError``
    naming ``--steps``."""
    import copy

    scheduler = getattr(pipe, "scheduler", None)
    config = getattr(scheduler, "config", None) or {}
    offset, trained = config.get("steps_offset", 0), config.get("num_train_timesteps")
    if steps is None or trained is None or steps > trained:  # more steps: diffusers refuses them
        return
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    excess = int(probe.timesteps.max()) - (trained - 1)
    if offset and excess > 0:
        pipe.scheduler = type(scheduler).from_config(config, steps_offset=max(offset - excess, 0))
        probe = copy.deepcopy(pipe.scheduler)
        probe.set_timesteps(steps)
    if len(set(probe.timesteps.tolist())) < steps:  # PNDM repeats one step by design: still `steps` distinct ones
        raise ValueError(f"--steps {steps}: the {type(scheduler).__name__} repeats timesteps at {steps} steps (its "
                         f"{config.get('timestep_spacing', 'default')} spacing leaves no room between them); use fewer "
                         "steps or another --scheduler")


def call_parameters(pipe: Any) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def call_default(pipe: Any, name: str) -> Any:
    """The value ``pipe(...)`` uses for its argument ``name`` when it is not passed: the pipeline config's
    ``default_<name>`` (zoo pipelines), else ``__call__``'s default; ``None`` if it has neither."""
    config = getattr(pipe, "config", None) or {}
    default = config.get(f"default_{name}")
    if default is None:
        parameter = inspect.signature(pipe.__call__).parameters.get(name)
        default = parameter.default if parameter is not None and parameter.default is not inspect.Parameter.empty else None
    return default


def sampler_steps(pipe: Any, steps: int | None = None) -> int | None:
    """Denoising steps ``pipe`` will run: ``steps``, else its default (``call_default``); ``None`` if unknown."""
    value = steps if steps is not None else call_default(pipe, "num_inference_steps")
    return value if isinstance(value, int) else None


def is_class_conditional(pipe: Any) -> bool:
    return "class_labels" in call_parameters(pipe)


def call_kwargs(
    pipe: Any,
    start: int,
    count: int,
    seed: int,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    prompts: Sequence[str] | None = None,
    num_classes: int = 10,
    output_type: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Arguments for ``pipe(**kwargs)`` producing samples ``start .. start + count - 1``.

    Sample ``i`` always gets generator seed ``seed + i`` and (conditional pipelines) class ``i % num_classes`` or
    prompt ``prompts[i % len(prompts)]``, so results do not depend on the batch size.
    """
    params = call_parameters(pipe)
    kwargs: dict[str, Any] = {"generator": [torch.Generator().manual_seed(seed + start + i) for i in range(count)]}
    if "prompt" in params:
        if not prompts:
            raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass prompts (e.g. --prompts FILE)")
        kwargs["prompt"] = [prompts[(start + i) % len(prompts)] for i in range(count)]
    elif "class_labels" in params:
        kwargs["class_labels"] = [(start + i) % num_classes for i in range(count)]
    elif "batch_size" in params:
        kwargs["batch_size"] = count
    optional = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "eta": eta,
        "output_type": output_type,
    }
    for key, value in optional.items():
        if value is not None and key in params:
            kwargs[key] = value
    kwargs.update(extra or {})
    return kwargs


# tqdm format for a bar that counts images in fractions (``step_progress``): "12.4/64 [00:31<02:10, 0.4img/s]"
IMAGE_BAR_FORMAT = "{l_bar}{bar}| {n:.1f}/{total:.0f} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


@contextlib.contextmanager
def step_progress(pipe: Any, bar: Any, count: int) -> Iterator[None]:
    """Advance the image-counting tqdm ``bar`` (best shown with ``IMAGE_BAR_FORMAT``) by ``count / steps`` at each denoiser call of one ``pipe(...)``
    call that makes ``count`` images, so it moves every sampler step instead of once per batch; afterwards it
    stands exactly ``count`` further. ``steps`` is the scheduler's timestep count (one denoiser call each); a
    pipeline without a ``unet``/``transformer`` module moves the bar once, at the end."""
    end = bar.n + count

    def hook(*_: Any) -> None:
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        steps = len(timesteps) if timesteps is not None else 0
        bar.update(min(count / max(steps, 1), end - bar.n))

    try:
        handle = denoiser_of(pipe).register_forward_hook(hook)
    except ValueError:  # a duck-typed pipeline without a denoiser module
        handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
    bar.update(end - bar.n)  # not after an interrupt: the bar stays where the work stopped


def quiet(pipe: Any) -> None:
    """Silence the pipeline's own per-step progress bar (questdiff shows one bar per job)."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def as_image_tensor(images: Any) -> torch.Tensor:
    """Pipeline ``.images`` (tensor ``[N, C, H, W]``, numpy ``[N, H, W, C]`` in [0, 1], or PIL list) -> float
    tensor ``[N, C, H, W]`` in [0, 1] on the CPU."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu()
    if isinstance(images, np.ndarray):
        array = images if images.ndim == 4 else images[..., None]
        return torch.from_numpy(array).float().permute(0, 3, 1, 2)
    if isinstance(images, list):
        arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
        return as_image_tensor(np.stack([a if a.ndim == 3 else a[..., None] for a in arrays]))
    raise TypeError(f"cannot convert pipeline output of type {type(images).__name__} to images")
