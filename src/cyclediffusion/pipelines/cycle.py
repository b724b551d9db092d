"""CycleDiffusion (Wu & De la Torre, 2022): edit a real image by changing its caption, and translate an image
between two models trained apart.

The DPM-Encoder writes the image as the noises of a stochastic DDIM chain (eta > 0) of the *source* prompt:
the chain starts from the image noised to ``strength`` and, at each step, the source chain samples the exact
posterior ``q(x_p | x_t, x0)`` while the noise that the source model's own DDIM step would have needed to land
there is recovered; the *target* chain replays those noises under the target prompt (or target model). What the
prompts share is kept, because it lives in the noises. The step maths is in
:meth:`~cyclediffusion.diffusion.base.NoiseProcessBase.cycle_step`; it needs only the path's
``(alpha_t, sigma_t)``, so it serves Gaussian diffusion of any prediction type and flow matching
(``alpha = 1 - t``, ``sigma = t``, with DDIM's stochastic step on that path) alike.

Two baselines share the code: ``sdedit`` (noise the image to ``strength`` with fresh noise, then denoise with the
target prompt) and ``ddim_inversion`` (invert the image with the eta = 0 DDIM chain of the source prompt, then run
that chain forward with the target prompt).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import read_json, weights_digest
from ..diffusion.base import Generator, StepCallback, randn
from ..images import ImageInput
from .base import DiffusionPipeline, Guidance, ImagePipelineOutput, as_list, broadcast_list, every
from .storage import INDEX_NAME, resolve_model_dir

METHODS = ("cycle", "sdedit", "ddim_inversion")
DIFFUSERS_GUIDANCE = 7.5  # diffusers' default guidance for Stable Diffusion, used for its components
TRANSLATION_GUIDANCE = 1.0  # two models trained apart, usually unconditional: no guidance unless asked
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name on the Hugging Face hub


class CycleDiffusionPipeline(DiffusionPipeline):
    """``CycleDiffusionPipeline(tokenizer, text_encoder, vae, denoiser, noise_process)``: text-guided editing.

    The call takes the parameters of diffusers' ``CycleDiffusionPipeline``. It loads models trained by this
    project (:meth:`from_pretrained`) and diffusers' Stable Diffusion components (:meth:`from_diffusers`).
    """

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> CycleDiffusionPipeline:
        """Load a model trained by this project (its folder or run folder), or a diffusers Stable Diffusion
        folder or hub name (through :mod:`cyclediffusion.integrations.diffusers`)."""
        path = Path(directory)
        if not path.exists() and not HUB_NAME.fullmatch(str(directory)):
            raise FileNotFoundError(f"{path} does not exist")
        if path.exists():
            path = resolve_model_dir(path)
            if "_diffusers_version" not in read_json(path / INDEX_NAME):
                return super().from_pretrained(path, device=device)
        from ..integrations.diffusers import load_stable_diffusion

        components = load_stable_diffusion(path if path.exists() else str(directory))
        return cls(**components, guidance_scale=DIFFUSERS_GUIDANCE).to(device).eval()

    @classmethod
    def from_diffusers(cls, vae, text_encoder, tokenizer, unet, scheduler) -> CycleDiffusionPipeline:
        """Wrap diffusers' ``AutoencoderKL``, ``UNet2DConditionModel`` and ``DDIMScheduler`` and transformers'
        ``CLIPTextModel`` and ``CLIPTokenizer`` (as in a Stable Diffusion pipeline)."""
        from ..integrations.diffusers import wrap_stable_diffusion

        components = wrap_stable_diffusion(vae, text_encoder, tokenizer, unet, scheduler)
        return cls(**components, guidance_scale=DIFFUSERS_GUIDANCE).eval()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        source_prompt: str | Sequence[str],
        image: ImageInput | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        source_guidance_scale: float = 1.0,
        eta: float = 0.1,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        callback_steps: int = 1,
        method: str = "cycle",
    ) -> ImagePipelineOutput:
        """Edit ``image`` (described by ``source_prompt``) so that it shows ``prompt``.

        Args:
            prompt: the target caption(s); each gives ``num_images_per_prompt`` edits.
            source_prompt: caption(s) of the input image(s): one, or one per prompt.
            image: PIL image(s), arrays in [0, 1], tensors (B, 3, H, W), or latents (B, C, h, w) with the VAE's
                channels; one image, or one per prompt.
            strength: how far into the chain the edit starts (0: the input unchanged, 1: from pure noise).
            num_inference_steps: steps of the full chain (``int(steps * strength)`` of them are run).
            guidance_scale: classifier-free guidance of the target chain (1: none; default: the model's own).
            source_guidance_scale: guidance of the source chain (1: none, and no unconditional pass for it).
            eta: DDIM stochasticity in (0, 1]; the DPM-Encoder needs eta > 0 (SDEdit uses it too).
            generator: a generator, or one per output image (``len(prompt) * num_images_per_prompt``).
            output_type: ``pil``, ``np``, ``pt`` or ``latent``.
            callback: ``callback(step, timestep, latents)`` every ``callback_steps`` steps.
            method: ``cycle`` (CycleDiffusion), ``sdedit`` or ``ddim_inversion``.
        """
        return edit(
            self,
            self,
            prompt,
            source_prompt,
            image,
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            source_guidance_scale=source_guidance_scale,
            eta=eta,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            output_type=output_type,
            callback=callback,
            callback_steps=callback_steps,
            method=method,
        )


def edit(
    source: DiffusionPipeline,
    target: DiffusionPipeline,
    prompt: str | Sequence[str],
    source_prompt: str | Sequence[str],
    image: ImageInput | None,
    strength: float = 0.8,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    source_guidance_scale: float = 1.0,
    eta: float = 0.1,
    num_images_per_prompt: int = 1,
    generator: Generator = None,
    output_type: str = "pil",
    callback: StepCallback | None = None,
    callback_steps: int = 1,
    method: str = "cycle",
) -> ImagePipelineOutput:
    """Encode ``image`` with the ``source`` pipeline and decode it with the ``target`` pipeline (the same object
    for an edit, two models for a translation); see :class:`CycleDiffusionPipeline` for the arguments."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "cycle" and eta <= 0:
        raise ValueError(f"eta={eta}: CycleDiffusion needs eta > 0 (its code is the noise of a stochastic chain)")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if num_inference_steps < 1 or num_images_per_prompt < 1:
        raise ValueError("num_inference_steps and num_images_per_prompt must be at least 1")
    prompts = as_list(prompt, "prompt")
    sources = broadcast_list(as_list(source_prompt, "source_prompt"), len(prompts), "source prompts")
    if source is not target:
        check_same_space(source, target)

    x0 = source.image_latents(image, len(prompts), num_images_per_prompt, generator)
    process = source.noise_process
    grid = process.grid(num_inference_steps)
    run = min(int(num_inference_steps * strength), num_inference_steps)
    grid = grid[num_inference_steps - run :]
    if not grid:  # strength too low for a single step: nothing changes
        return target.postprocess(x0, output_type)

    tgt = target.prompt_guidance(prompts, guidance_scale, num_images_per_prompt)
    src = source.prompt_guidance(sources, source_guidance_scale, num_images_per_prompt)
    callback = every(callback, callback_steps)
    target_fn = lambda x, t: target.guided_predictions([x], t, [tgt])[0]  # noqa: E731
    if method == "ddim_inversion":
        x = process.invert(lambda x, t: source.guided_predictions([x], t, [src])[0], x0, grid)
        x = target.noise_process.denoise(target_fn, x, grid, 0.0, callback=callback)
        return target.postprocess(x, output_type)

    x = process.add_noise(x0, randn(x0.shape, generator, x0.device), grid[0][0])
    if method == "sdedit":
        x = target.noise_process.denoise(target_fn, x, grid, eta, generator, callback)
        return target.postprocess(x, output_type)

    predict = paired_predictions(source, target, src, tgt)
    x_src = x_tgt = x
    for i, (t, t_prev) in enumerate(grid):
        src_prediction, tgt_prediction = predict(x_src, x_tgt, process.model_time_of(t, x))
        x_src, x_tgt = process.cycle_step(
            x0,
            x_src,
            src_prediction,
            x_tgt,
            tgt_prediction,
            t,
            t_prev,
            eta,
            generator,
            last=i == len(grid) - 1,
            target_process=target.noise_process,
        )
        if callback is not None:
            callback(i, process.model_time_of(t, x)[0], x_tgt)
    return target.postprocess(x_tgt, output_type)


def paired_predictions(
    source: DiffusionPipeline, target: DiffusionPipeline, src: Guidance, tgt: Guidance
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(x_src, x_tgt, t) -> (source prediction, target prediction)``: one batched call for one model."""
    if source is target:
        return lambda x_src, x_tgt, t: tuple(source.guided_predictions([x_src, x_tgt], t, [src, tgt]))
    return lambda x_src, x_tgt, t: (
        source.guided_predictions([x_src], t, [src])[0],
        target.guided_predictions([x_tgt], t, [tgt])[0],
    )


def check_same_space(source: DiffusionPipeline, target: DiffusionPipeline) -> None:
    """Two-model translation needs one latent space (the same VAE) and one noise path (the same schedule)."""
    if (source.vae is None) != (target.vae is None) or (
        source.vae is not None and weights_digest(source.vae) != weights_digest(target.vae)
    ):
        raise ValueError("the source and target models must share their VAE (one latent space) to translate")
    a, b = source.noise_process, target.noise_process
    if type(a) is not type(b) or a.grid(10) != b.grid(10) or not _same_path(a, b):
        raise ValueError("the source and target models must use the same noise schedule to translate")


def _same_path(a, b) -> bool:
    like = torch.zeros(1)
    return all(
        torch.allclose(x, y) for t, _ in a.grid(50) for x, y in zip(a.alpha_sigma(t, like), b.alpha_sigma(t, like))
    )


def translate(
    image: ImageInput,
    source_model: DiffusionPipeline | str | Path,
    target_model: DiffusionPipeline | str | Path,
    source_prompt: str | Sequence[str] = "",
    prompt: str | Sequence[str] | None = None,
    **kwargs,
) -> ImagePipelineOutput:
    """Unpaired translation (the paper's two-model setting): encode ``image`` with the DPM-Encoder of
    ``source_model`` and decode its noises with ``target_model``, a model trained apart on a related domain in the
    same latent space. Prompts default to the empty one (unconditional models); other keyword arguments are those
    of :class:`CycleDiffusionPipeline` (``strength``, ``eta``, ``num_inference_steps``, ``generator``, ...)."""
    source = (
        source_model
        if isinstance(source_model, DiffusionPipeline)
        else CycleDiffusionPipeline.from_pretrained(source_model)
    )
    target = (
        target_model
        if isinstance(target_model, DiffusionPipeline)
        else CycleDiffusionPipeline.from_pretrained(target_model)
    )
    prompt = source_prompt if prompt is None else prompt
    kwargs = {"guidance_scale": TRANSLATION_GUIDANCE, **kwargs}
    return edit(source, target, prompt, source_prompt, image, **kwargs)
