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

Its successors and two baselines share the edit core of :mod:`~cyclediffusion.pipelines.edit` (``method=``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import read_json
from ..diffusion.base import Generator, StepCallback
from ..images import ImageInput
from .base import DiffusionPipeline, ImagePipelineOutput
from .coupling import AttentionCoupling
from .edit import MaskInput, edit
from .implicit_mask import THRESHOLD
from .storage import INDEX_NAME, resolve_model_dir

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
        mask_image: MaskInput | None = None,
        coupling: AttentionCoupling | None = None,
        resample: int = 0,
        mask_threshold: float = THRESHOLD,
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
            method: ``cycle`` (CycleDiffusion), ``ef_ddpm``, ``ddim_inversion``, ``sdedit`` or (flow models)
                ``flowedit``; see :mod:`~cyclediffusion.pipelines.edit`.
            mask_image: where to edit (white) and what to keep (black): a single-channel binary image of the
                input's size, or one per prompt; everything outside stays the source's. ``"auto"``: the mask is
                read from the model, where the target prompt's clean-image estimate departs from the source's.
            coupling: an :class:`~cyclediffusion.pipelines.coupling.AttentionCoupling`: the target branch reuses
                the source branch's attention weights (prompt-to-prompt) for a share of the steps.
            resample: with a mask (``cycle``, ``ef_ddpm``, ``sdedit``), take every step but the last ``1 +
                resample`` times, noising the blended branches back up in between (RePaint): the target draws its
                change inside the mask instead of beside it. Costs ``1 + resample`` times the network calls.
            mask_threshold: with ``mask_image="auto"``, where the mask is cut, as a share of the largest
                difference of the two prompts' estimates in (0, 1): lower marks more of the image as editable.

        Returns the images, with ``nfe``: denoiser evaluations per edited image.
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
            mask_image=mask_image,
            coupling=coupling,
            resample=resample,
            mask_threshold=mask_threshold,
        )


@torch.no_grad()
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
