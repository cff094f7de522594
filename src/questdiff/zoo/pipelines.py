"""Sampling pipelines of the zoo: pixel-space DDPM, unconditional LDM, class-conditional LDM and class-conditional
DiT, both with CFG.

All four share one call convention::

    pipe(batch_size=4, num_inference_steps=None, generator=None, output_type="pt", eta=None)

``None`` means the zoo model's paper setting, stored in the pipeline config (``default_num_inference_steps``,
``default_eta``, ``default_guidance_scale``). ``output_type="pt"`` gives ``.images`` as ``[N, 1, 32, 32]`` float in
``[0, 1]`` on the pipeline's device, ``"np"`` a ``[N, 32, 32, 1]`` float array, ``"pil"`` a list of grey PIL images.
The loop is the standard ``set_timesteps / scale_model_input / step`` one, so any diffusers scheduler can be swapped
in. The denoiser is ``pipe.unet`` (called as ``unet(x, t[, encoder_hidden_states=...])``), or ``pipe.transformer``
for the DiT (``transformer(x, timestep=t [B], class_labels=[B])``).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

OUTPUT_TYPES = ("pt", "np", "pil")
Generator = torch.Generator | list[torch.Generator] | None


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Learned class tokens: labels ``[N]`` (int, ``num_classes`` = the null token) -> context ``[N, 1, embed_dim]``.

    Mirrors LDM's ``ClassEmbedder`` (ImageNet LDM-4): one token that the UNet cross-attends to.
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, embed_dim: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_label(self) -> int:
        """Index of the unconditional (null) token used for classifier-free guidance."""
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None, :]


class _ZooPipeline(DiffusionPipeline):
    """Shared sampling loop and output handling; subclasses define ``__call__`` and the denoiser call."""

    @property
    def denoiser(self) -> nn.Module:
        """``unet``, or ``transformer`` for the DiT."""
        return self.unet if hasattr(self, "unet") else self.transformer

    def _resolve(self, num_inference_steps: int | None, eta: float | None) -> tuple[int, float]:
        steps = self.config.default_num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        return steps, self.config.default_eta if eta is None else float(eta)

    def _initial_noise(self, batch_size: int, generator: Generator) -> torch.Tensor:
        """Unit Gaussian noise ``[N, C, H, W]`` in the denoiser's space (``_denoise`` scales it)."""
        cfg = self.denoiser.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
        shape = (batch_size, cfg.in_channels, *size)
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.denoiser.dtype)

    def _step_kwargs(self, eta: float, generator: Generator) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _denoise(
        self,
        x: torch.Tensor,
        predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        num_inference_steps: int,
        eta: float,
        generator: Generator,
    ) -> torch.Tensor:
        """Runs the scheduler loop from unit noise ``x`` to a clean sample of the same shape."""
        self.scheduler.set_timesteps(num_inference_steps, device=x.device)
        # init_noise_sigma depends on the step count for sigma-based schedulers (Euler): read it after set_timesteps
        x = x * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(eta, generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            noise = predict_noise(model_input, t)
            x = self.scheduler.step(noise, t, x, **step_kwargs, return_dict=False)[0]
        return x

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, 4, 8, 8]`` (unit-variance scale) -> images ``[N, 1, 32, 32]`` in about ``[-1, 1]``."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def _output(self, images: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """``images`` ``[N, 1, H, W]`` in ``[-1, 1]`` -> the requested output type in ``[0, 1]``."""
        result: Any = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            result = result.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=result) if return_dict else (result,)


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def _class_labels(class_labels: Sequence[int] | torch.Tensor | None, batch_size: int | None, num_classes: int,
                  device: torch.device) -> torch.Tensor:
    """Label tensor ``[N]``; without labels, ``batch_size`` images cycle through the classes 0, 1, ..."""
    if class_labels is None:
        labels = torch.arange(1 if batch_size is None else batch_size) % num_classes
    else:
        given = torch.as_tensor(class_labels).reshape(-1)
        if given.is_floating_point() and not bool((given == given.round()).all()):
            raise ValueError(f"class_labels must be whole class indices, got {class_labels!r}")
        labels = given.long()
        if batch_size is not None and batch_size != labels.numel():
            raise ValueError(f"batch_size={batch_size} but {labels.numel()} class_labels were given; pass one")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class_labels must lie in [0, {num_classes - 1}], got {labels.tolist()}")
    return labels.to(device)


def _guided(predict: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], cond: Any, uncond: Any,
            scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``predict(x, t, condition)`` with classifier-free guidance ``scale``: one doubled batch per step,
    **unconditional half first** (``uncond``/``cond`` are batched conditionings, concatenated on dim 0), or one plain
    conditional call when ``scale <= 1``."""
    if scale <= 1.0:
        return lambda xt, t: predict(xt, t, cond)
    both = torch.cat([uncond, cond])

    def guided(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond_eps, cond_eps = predict(torch.cat([xt, xt]), t, both).chunk(2)
        return uncond_eps + scale * (cond_eps - uncond_eps)

    return guided


class PixelDiffusionPipeline(_ZooPipeline):
    """Unconditional pixel-space diffusion (mirrors CIFAR-10 DDPM): components ``unet``, ``scheduler``."""

    def __init__(
        self,
        unet: nn.Module,
        scheduler: SchedulerMixin,
        default_num_inference_steps: int = 100,
        default_eta: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps, default_eta=default_eta)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: Generator = None,
        output_type: str = "pil",
        eta: float | None = None,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Samples ``batch_size`` images; see the module docstring for the outputs."""
        _check_output_type(output_type)
        steps, eta = self._resolve(num_inference_steps, eta)
        x = self._initial_noise(batch_size, generator)
        x = self._denoise(x, lambda xt, t: self.unet(xt, t, return_dict=False)[0], steps, eta, generator)
        return self._output(x, output_type, return_dict)


class LatentDiffusionPipeline(_ZooPipeline):
    """Unconditional latent diffusion (mirrors LSUN-Bedrooms LDM-4): components ``vae``, ``unet``, ``scheduler``."""

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: nn.Module,
        scheduler: SchedulerMixin,
        default_num_inference_steps: int = 200,
        default_eta: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps, default_eta=default_eta)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: Generator = None,
        output_type: str = "pil",
        eta: float | None = None,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Samples ``batch_size`` images; see the module docstring for the outputs."""
        _check_output_type(output_type)
        steps, eta = self._resolve(num_inference_steps, eta)
        latents = self._initial_noise(batch_size, generator)
        latents = self._denoise(
            latents, lambda xt, t: self.unet(xt, t, return_dict=False)[0], steps, eta, generator
        )
        return self._output(self._decode_latents(latents), output_type, return_dict)


class ClassConditionalLDMPipeline(_ZooPipeline):
    """Class-conditional latent diffusion with classifier-free guidance (mirrors ImageNet LDM-4).

    Components ``vae``, ``unet``, ``class_embedder`` (kept full precision), ``scheduler``. With guidance the UNet
    runs once per step on a doubled batch, **unconditional half first**: ``[x, x]`` with context
    ``[null tokens, class tokens]``, and ``eps = eps_uncond + g * (eps_cond - eps_uncond)``.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: nn.Module,
        class_embedder: ClassEmbedder,
        scheduler: SchedulerMixin,
        default_num_inference_steps: int = 20,
        default_eta: float = 0.0,
        default_guidance_scale: float = 3.0,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, class_embedder=class_embedder, scheduler=scheduler)
        self.register_to_config(
            default_num_inference_steps=default_num_inference_steps,
            default_eta=default_eta,
            default_guidance_scale=default_guidance_scale,
        )

    def _context(self, labels: torch.Tensor) -> torch.Tensor:
        """Class tokens ``[N, 1, D]`` in the UNet's dtype."""
        return self.class_embedder(labels).to(self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        generator: Generator = None,
        output_type: str = "pil",
        eta: float | None = None,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Samples one image per class label (``guidance_scale <= 1`` disables guidance: one plain conditional
        forward per step); see the module docstring for the outputs."""
        _check_output_type(output_type)
        steps, eta = self._resolve(num_inference_steps, eta)
        scale = self.config.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        labels = _class_labels(class_labels, batch_size, self.class_embedder.config.num_classes, self._execution_device)
        latents = self._initial_noise(labels.numel(), generator)
        null = self._context(torch.full_like(labels, self.class_embedder.null_label))

        def predict(xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.unet(xt, t, encoder_hidden_states=context, return_dict=False)[0]

        latents = self._denoise(latents, _guided(predict, self._context(labels), null, scale), steps, eta, generator)
        return self._output(self._decode_latents(latents), output_type, return_dict)


class ClassConditionalDiTPipeline(_ZooPipeline):
    """Class-conditional latent DiT with classifier-free guidance (mirrors ImageNet DiT-XL/2 256): components
    ``vae``, ``transformer`` (diffusers ``DiTTransformer2DModel``: adaLN-Zero, the class embedding inside every block,
    null class = ``num_embeds_ada_norm``), ``scheduler``.

    Like ``DiTPipeline`` but with the zoo's call convention and any number of classes (``DiTPipeline`` hard-codes
    ImageNet's null class 1000); with guidance the unconditional half comes first, as in the LDM pipeline.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        transformer: nn.Module,
        scheduler: SchedulerMixin,
        default_num_inference_steps: int = 20,
        default_eta: float = 0.0,
        default_guidance_scale: float = 1.5,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler)
        self.register_to_config(
            default_num_inference_steps=default_num_inference_steps,
            default_eta=default_eta,
            default_guidance_scale=default_guidance_scale,
        )

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        generator: Generator = None,
        output_type: str = "pil",
        eta: float | None = None,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Samples one image per class label (``guidance_scale <= 1``: no guidance); see the module docstring."""
        _check_output_type(output_type)
        steps, eta = self._resolve(num_inference_steps, eta)
        scale = self.config.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        labels = _class_labels(class_labels, batch_size, self.num_classes, self._execution_device)
        latents = self._initial_noise(labels.numel(), generator)

        def predict(xt: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
            timestep = torch.as_tensor(t, device=xt.device).reshape(-1).expand(len(xt))  # DiT embeds a [B] timestep
            return self.transformer(xt, timestep=timestep, class_labels=classes, return_dict=False)[0]

        guided = _guided(predict, labels, torch.full_like(labels, self.num_classes), scale)
        latents = self._denoise(latents, guided, steps, eta, generator)
        return self._output(self._decode_latents(latents), output_type, return_dict)
