"""Text-to-image generation: prompt -> text states -> sampler over latents -> VAE decoder -> images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..diffusion.base import Generator, randn
from .base import DiffusionPipeline, ImagePipelineOutput, as_list, every


class Text2ImagePipeline(DiffusionPipeline):
    """``Text2ImagePipeline(tokenizer, text_encoder, vae, denoiser, noise_process)``.

    ``vae=None`` means the denoiser works on pixels. Works for any noise process of
    :mod:`cyclediffusion.diffusion` and any denoiser with the ``(x, t, context, pooled)`` interface.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str = "pil",
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
    ) -> ImagePipelineOutput:
        """Generate images for ``prompt``.

        Args:
            prompt: one prompt or a list; each gives ``num_images_per_prompt`` images.
            negative_prompt: what guidance steers away from (default: the empty prompt that the
                model saw when its caption was dropped in training).
            num_inference_steps: sampler steps (default: :attr:`default_steps`, the model's own, else 50).
            guidance_scale: classifier-free guidance weight ``w``; 1 disables guidance (default: the model's own,
                :attr:`guidance_scale`).
            generator: a generator, or one per image, for the starting noise and sampler noise.
            output_type: ``pil``, ``np`` (B, H, W, 3), ``pt`` (B, 3, H, W) in [0, 1], or ``latent``.
            callback: ``callback(step, timestep, latents)`` every ``callback_steps`` steps.
            height, width: image size in pixels (default: the denoiser's training size).
            latents: starting noise, to reuse instead of drawing it.
            sampler: ``ddim`` (default), ``ddpm`` or ``dpm++2m`` for Gaussian diffusion; ``euler`` (default),
                ``heun`` or ``dpm++2m`` for flow matching.
            eta: DDIM's stochasticity in [0, 1]: Gaussian diffusion's ``ddim`` and flow matching's ``euler``.
        """
        prompts = as_list(prompt, "prompt")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        batch = len(prompts) * num_images_per_prompt
        guidance = self.prompt_guidance(prompts, guidance_scale, num_images_per_prompt, negative_prompt)
        model_fn = self.guided_model_fn(guidance.cond, guidance.uncond, guidance.scale)

        if latents is None:
            latents = randn(self.latent_shape(batch, height, width), generator, self.device)
        elif latents.shape[0] != batch:
            raise ValueError(f"latents hold {latents.shape[0]} samples, expected {batch}")
        latents = latents.to(self.device, torch.float32)

        x0 = self.noise_process.sample(
            model_fn,
            latents,
            num_inference_steps or self.default_steps,
            sampler=sampler,
            eta=eta,
            generator=generator,
            callback=every(callback, callback_steps),
        )
        return self.postprocess(x0, output_type)

    def latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the starting noise for images of ``height`` x ``width`` pixels."""
        factor = self.latent_factor
        default = self.denoiser.sample_size * factor
        height, width = height or default, width or default
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        return (batch, self.denoiser.in_channels, height // factor, width // factor)
