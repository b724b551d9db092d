"""Text-to-image generation: prompt -> text states -> sampler over latents -> VAE decoder -> images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..diffusion.base import Generator, ModelFn, randn
from .base import DiffusionPipeline, Guidance, ImagePipelineOutput, PromptEmbeds, SelfCondition, as_list, every
from .storage import INDEX_NAME

# Autoguidance's recipe: weight GUIDE_SCALE away from the guide, with classifier-free guidance GUIDE_GUIDANCE beside it
# (lower than a model's plain guidance: together they counted and bound best on five 10-minute demo-recipe models of
# the settings tried, 1-5 and 1-4; README, "Self-conditioning and autoguidance").
GUIDE_SCALE, GUIDE_GUIDANCE = 3.0, 2.0
GUIDE_FOLDER = "guide"  # a saved pipeline's own autoguidance model: a complete pipeline in this sub-folder
# model_index.json: the autoguidance weight, and the classifier-free guidance beside it, of a call given neither
GUIDE_SCALE_KEY, GUIDE_GUIDANCE_KEY = "_guide_scale", "_guide_guidance_scale"


class Text2ImagePipeline(DiffusionPipeline):
    """``Text2ImagePipeline(tokenizer, text_encoder, vae, denoiser, noise_process)``.

    ``vae=None`` means the denoiser works on pixels. Works for any noise process of
    :mod:`cyclediffusion.diffusion` and any denoiser with the ``(x, t, context, pooled)`` interface.

    A pipeline may carry its own autoguidance model, ``guide`` (a weaker model of the same kind, such as its run's
    ``train --export-guide`` copy), used by every call with weight ``guide_scale`` and classifier-free guidance
    ``guide_guidance_scale`` unless the call says otherwise (``guide_scale=0``: the plain model, at its own
    ``guidance_scale``); :meth:`save_pretrained` writes it into the ``guide/`` sub-folder and :meth:`from_pretrained`
    loads it from there.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        denoiser,
        noise_process,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        guide: Text2ImagePipeline | None = None,
        guide_scale: float | None = None,
        guide_guidance_scale: float | None = None,
    ) -> None:
        super().__init__(tokenizer, text_encoder, vae, denoiser, noise_process, guidance_scale, num_inference_steps)
        self.guide = None if guide is None else self.check_guide(guide)
        self.guide_scale = GUIDE_SCALE if guide_scale is None else float(guide_scale)
        self.guide_guidance_scale = GUIDE_GUIDANCE if guide_guidance_scale is None else float(guide_guidance_scale)
        if self.guide_scale < 0:
            raise ValueError(f"guide scale must be non-negative, got {self.guide_scale}")

    # ----------------------------------------------------------------- the guide travels with the model
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Text2ImagePipeline:
        super().to(device, dtype)
        if self.guide is not None:
            self.guide.to(device, dtype)
        return self

    def eval(self) -> Text2ImagePipeline:
        super().eval()
        if self.guide is not None:
            self.guide.eval()
        return self

    def compile(self, **options: Any) -> Text2ImagePipeline:
        super().compile(**options)
        if self.guide is not None:
            self.guide.compile(**options)
        return self

    def index_settings(self) -> dict[str, Any]:
        settings = super().index_settings()
        if self.guide is not None:
            settings |= {GUIDE_SCALE_KEY: self.guide_scale, GUIDE_GUIDANCE_KEY: self.guide_guidance_scale}
        return settings

    def save_pretrained(self, directory: str | Path) -> None:
        """As :meth:`DiffusionPipeline.save_pretrained`, with the pipeline's guide (if any) in ``guide/``."""
        super().save_pretrained(directory)
        if self.guide is not None:
            self.guide.save_pretrained(Path(directory) / GUIDE_FOLDER)

    @classmethod
    def index_defaults(cls, index: dict[str, Any], directory: Path, device: str | torch.device | None) -> dict:
        defaults = super().index_defaults(index, directory, device)
        if GUIDE_SCALE_KEY in index and (directory / GUIDE_FOLDER / INDEX_NAME).is_file():
            defaults["guide"] = Text2ImagePipeline.from_pretrained(directory / GUIDE_FOLDER, device=device)
            defaults["guide_scale"] = index[GUIDE_SCALE_KEY]
            defaults["guide_guidance_scale"] = index.get(GUIDE_GUIDANCE_KEY)
        return defaults

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
        guide: Text2ImagePipeline | None = None,
        guide_scale: float | None = None,
    ) -> ImagePipelineOutput:
        """Generate images for ``prompt``.

        Args:
            prompt: one prompt or a list; each gives ``num_images_per_prompt`` images.
            negative_prompt: what guidance steers away from (default: the empty prompt that the
                model saw when its caption was dropped in training).
            num_inference_steps: sampler steps (default: :attr:`default_steps`, the model's own, else 50).
            guidance_scale: classifier-free guidance weight ``w``; 1 disables guidance (default: the model's own,
                :attr:`guidance_scale`, or with a guide :attr:`guide_guidance_scale`).
            generator: a generator, or one per image, for the starting noise and sampler noise.
            output_type: ``pil``, ``np`` (B, H, W, 3), ``pt`` (B, 3, H, W) in [0, 1], or ``latent``.
            callback: ``callback(step, timestep, latents)`` every ``callback_steps`` steps.
            height, width: image size in pixels (default: the denoiser's training size).
            latents: starting noise, to reuse instead of drawing it.
            sampler: ``ddim`` (default), ``ddpm`` or ``dpm++2m`` for Gaussian diffusion; ``euler`` (default),
                ``heun`` or ``dpm++2m`` for flow matching.
            eta: DDIM's stochasticity in [0, 1]: Gaussian diffusion's ``ddim`` and flow matching's ``euler``.
            guide: autoguidance (Karras et al. 2024): a weaker model of the same kind, such as this model's own
                run exported part of the way (``train --export-guide``); the prediction moves ``guide_scale`` times
                the distance from the guide's conditional prediction to this model's, on top of classifier-free
                guidance: ``uncond + w (cond - uncond) + guide_scale (cond - guide_cond)``. Default: the pipeline's
                own :attr:`guide` (none unless its folder has one).
            guide_scale: the autoguidance weight (default: the pipeline's :attr:`guide_scale`, :data:`GUIDE_SCALE`
                unless its folder says otherwise); 0 samples without the guide, one network call less per step.
        """
        prompts = as_list(prompt, "prompt")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        batch = len(prompts) * num_images_per_prompt
        _, model_fn = self.sampling_model_fn(
            prompts, guidance_scale, num_images_per_prompt, negative_prompt, guide=guide, guide_scale=guide_scale
        )

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

    def sampling_model_fn(
        self,
        prompts: list[str],
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        negative_prompt: str | Sequence[str] | None = None,
        guide: Text2ImagePipeline | None = None,
        guide_scale: float | None = None,
    ) -> tuple[Guidance, ModelFn]:
        """The prompts' guidance and the ``model_fn(x_t, t)`` that :meth:`__call__` samples them with, under the
        same defaults: the pipeline's own guide, guide scale and guidance unless given; classifier-free guidance
        alone without a guide or at ``guide_scale=0``. Few-step distillation follows the same function."""
        guide = self.guide if guide is None else guide
        guide_scale = self.guide_scale if guide_scale is None else guide_scale
        if guide_scale < 0:
            raise ValueError(f"guide scale must be non-negative, got {guide_scale}")
        if guide is not None and guide_scale == 0:
            guide = None
        if guide is not None and guidance_scale is None:
            guidance_scale = self.guide_guidance_scale
        guidance = self.prompt_guidance(prompts, guidance_scale, num_images_per_prompt, negative_prompt)
        if guide is None:
            return guidance, self.guided_model_fn(guidance.cond, guidance.uncond, guidance.scale)
        guide_cond = self.check_guide(guide).encode_prompt(prompts).repeat(num_images_per_prompt)
        return guidance, self.autoguided_model_fn(guidance, guide, guide_cond, guide_scale)

    def check_guide(self, guide: Text2ImagePipeline) -> Text2ImagePipeline:
        """``guide``, once it is known to predict what this model predicts, on the same latents."""
        process, other = self.noise_process, guide.noise_process
        same_kind = type(process) is type(other) and getattr(process, "prediction_type", None) == getattr(
            other, "prediction_type", None
        )
        if not same_kind:
            raise ValueError("the guide must be trained with the same noise process and prediction type")
        if (guide.denoiser.in_channels, guide.latent_factor) != (self.denoiser.in_channels, self.latent_factor):
            raise ValueError("the guide must work on the same latents (its VAE's channels and downsampling)")
        return guide

    def autoguided_model_fn(
        self, guidance: Guidance, guide: Text2ImagePipeline, guide_cond: PromptEmbeds, guide_scale: float
    ) -> ModelFn:
        """``model_fn(x_t, t)`` of :meth:`__call__`'s ``guide``: classifier-free guidance plus ``guide_scale`` x
        (this model's conditional prediction - the guide's)."""
        guide_fn = guide.guided_model_fn(guide_cond, None, 1.0)
        state = SelfCondition()

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if guidance.guided:
                uncond, cond = self.guided_predictions([x, x], t, [Guidance(guidance.uncond), Guidance(guidance.cond)],
                                                       state)  # fmt: skip
                guided = uncond + guidance.scale * (cond - uncond)
            else:
                cond = guided = self.guided_predictions([x], t, [guidance], state)[0]
            return guided + guide_scale * (cond - guide_fn(x, t))

        return model_fn

    def latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the starting noise for images of ``height`` x ``width`` pixels."""
        factor = self.latent_factor
        default = self.denoiser.sample_size * factor
        height, width = height or default, width or default
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        return (batch, self.denoiser.in_channels, height // factor, width // factor)
