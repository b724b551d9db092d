"""What every pipeline shares: components, prompt encoding, guided prediction, image conversion, storage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from ..config import read_json
from ..diffusion.base import Generator, ModelFn, StepCallback, randn
from ..images import ImageInput, images_to_tensor, numpy_to_pil
from ..recipes import DEFAULT_GUIDANCE
from .storage import INDEX_NAME, find_pipeline, load_components, save_components

P = TypeVar("P", bound="DiffusionPipeline")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GUIDANCE_KEY = "_guidance_scale"  # model_index.json: the guidance a call uses when given none
STEPS_KEY = "_num_inference_steps"  # model_index.json, a few-step (distilled) model's: the steps a call takes
DEFAULT_STEPS = 50  # sampler steps of a model that names none


@dataclass
class ImagePipelineOutput:
    """``images``: a list of PIL images, a (B, H, W, 3) float array in [0, 1], or a (B, 3, H, W) tensor; ``nfe``:
    denoiser evaluations per image (edits report it)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    nfe: float | None = None


@dataclass
class SelfCondition:
    """What a self-conditioned denoiser read last: the x0 estimate of every row of its previous batched call, carried
    from one sampler step to the next. One per sampling run; a call whose rows differ starts from zeros."""

    x0: torch.Tensor | None = None


@dataclass
class PromptEmbeds:
    """Encoded prompts: per-token states for cross-attention, the pooled vector, and the real tokens (None: attend
    to every position)."""

    context: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None

    def repeat(self, n: int) -> PromptEmbeds:
        """Each prompt ``n`` times in a row (for ``num_images_per_prompt``)."""
        mask = None if self.mask is None else self.mask.repeat_interleave(n, 0)
        return PromptEmbeds(self.context.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0), mask)


@dataclass
class Guidance:
    """How one batch is conditioned: prompt states, the unconditional states and the classifier-free guidance
    weight (guided only when ``uncond`` is given and ``scale != 1``)."""

    cond: PromptEmbeds
    uncond: PromptEmbeds | None = None
    scale: float = 1.0

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.scale != 1.0


def pick_device(name: str = "auto") -> str:
    """``auto``: the GPU when there is one, else the CPU; any other name as it is."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def as_list(text: str | Sequence[str], name: str) -> list[str]:
    """A prompt or list of prompts as a non-empty list."""
    items = [text] if isinstance(text, str) else list(text)
    if not items or not all(isinstance(t, str) for t in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return items


def every(callback: StepCallback | None, steps: int) -> StepCallback | None:
    """``callback`` called only on every ``steps``-th step (diffusers' ``callback_steps``)."""
    if callback is None:
        return None
    if steps < 1:
        raise ValueError(f"callback_steps must be at least 1, got {steps}")
    return lambda i, t, x: callback(i, t, x) if i % steps == 0 else None


def broadcast_list(items: list, n: int, what: str) -> list:
    """``items`` of length 1 or ``n`` as a list of length ``n``."""
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise ValueError(f"got {len(items)} {what} for {n} prompts")
    return items


def expand_rows(x: torch.Tensor, num_prompts: int, num_images_per_prompt: int) -> torch.Tensor:
    """One row per prompt (a single image serves every prompt), each repeated ``num_images_per_prompt`` times."""
    if x.shape[0] == 1 and num_prompts > 1:
        x = x.expand(num_prompts, *x.shape[1:])
    if x.shape[0] != num_prompts:
        raise ValueError(f"got {x.shape[0]} images for {num_prompts} prompts (give one, or one per prompt)")
    return x.repeat_interleave(num_images_per_prompt, dim=0)


class DiffusionPipeline:
    """A text-conditioned diffusion model's components: holds them, moves them, saves and loads them, and
    encodes prompts, guides predictions and converts images for the pipelines built on it."""

    component_names: tuple[str, ...] = ("tokenizer", "text_encoder", "vae", "denoiser", "noise_process")

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        denoiser,
        noise_process,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
    ) -> None:
        """``vae=None`` means the denoiser works on pixels. ``guidance_scale`` is the guidance a call uses when it
        is given none: the value the model was trained and evaluated with, stored in its folder (default
        :data:`~cyclediffusion.recipes.DEFAULT_GUIDANCE`). ``num_inference_steps``, likewise, the sampler steps of
        a model trained for a number of them (a distilled student); None for any number (default
        :data:`DEFAULT_STEPS`)."""
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.denoiser = denoiser
        self.noise_process = noise_process
        self.guidance_scale = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
        self.num_inference_steps = num_inference_steps

    @property
    def default_steps(self) -> int:
        """The sampler steps a call takes when given none: the model's own, else :data:`DEFAULT_STEPS`."""
        return self.num_inference_steps or DEFAULT_STEPS

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.component_names}

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        for module in self.modules:
            for p in module.parameters():
                return p.device
        return torch.device("cpu")

    def to(self: P, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> P:
        """Move (and optionally cast) every network; returns self."""
        for module in self.modules:
            module.to(device=device, dtype=dtype)
        return self

    def eval(self: P) -> P:
        for module in self.modules:
            module.eval()
        return self

    def compile(self: P, **options: Any) -> P:
        """``torch.compile`` the denoiser, the network every sampler step calls (``nn.Module.compile``: the module,
        its weights and what :meth:`save_pretrained` writes stay as they are); returns self. ``options`` go to
        ``torch.compile``.

        The first call at each batch shape compiles (tens of seconds on a CPU); later calls run the compiled graph
        with far fewer dispatches per step. It pays for many calls (``eval``, a served UI), not for one image."""
        self.denoiser.compile(**options)
        return self

    # ----------------------------------------------------------------- storage
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model_index.json`` (with the default guidance, and steps when the model has its own) and one
        folder per component (config.json + model.safetensors)."""
        save_components(directory, type(self).__name__, self.components, self.index_settings())

    def index_settings(self) -> dict[str, Any]:
        """The ``_``-prefixed defaults :meth:`save_pretrained` writes into ``model_index.json``."""
        settings: dict[str, Any] = {GUIDANCE_KEY: self.guidance_scale}
        if self.num_inference_steps is not None:
            settings[STEPS_KEY] = self.num_inference_steps
        return settings

    @classmethod
    def index_defaults(cls, index: dict[str, Any], directory: Path, device: str | torch.device | None) -> dict:
        """The constructor's keyword arguments that :meth:`from_pretrained` reads from ``model_index.json`` (and
        from sub-folders of ``directory`` other than the components)."""
        return {"guidance_scale": index.get(GUIDANCE_KEY), "num_inference_steps": index.get(STEPS_KEY)}

    @classmethod
    def from_pretrained(cls: type[P], directory: str | Path, device: str | torch.device | None = None) -> P:
        """Load a pipeline saved by :meth:`save_pretrained`, from its folder or a run folder (never unpickles)."""
        directory = find_pipeline(directory)
        _, components = load_components(directory, device=device)
        missing = [n for n in cls.component_names if n not in components]
        if missing:
            raise ValueError(f"{directory} lacks component(s) {', '.join(missing)} needed by {cls.__name__}")
        defaults = cls.index_defaults(read_json(directory / INDEX_NAME), directory, device)
        return cls(**{n: components[n] for n in cls.component_names}, **defaults).eval()

    # ----------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> PromptEmbeds:
        """Token states and pooled vectors of the prompts."""
        ids = self.tokenizer(prompts).input_ids.to(self.device)
        out = self.text_encoder(ids)
        return PromptEmbeds(out.hidden_states, out.pooled, out.mask)

    def prompt_guidance(
        self,
        prompts: list[str],
        guidance_scale: float | None,
        num_images_per_prompt: int = 1,
        negative_prompt: str | Sequence[str] | None = None,
    ) -> Guidance:
        """Encode ``prompts`` (each repeated ``num_images_per_prompt`` times) and, when guided, the negative prompts
        (default: the empty prompt the model saw when its caption was dropped in training). ``guidance_scale``
        None is the pipeline's own default."""
        if guidance_scale is None:
            guidance_scale = self.guidance_scale
        if guidance_scale < 0:
            raise ValueError(f"guidance scale must be non-negative, got {guidance_scale}")
        cond = self.encode_prompt(prompts).repeat(num_images_per_prompt)
        if guidance_scale == 1.0:
            return Guidance(cond)
        negatives = [""] * len(prompts) if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
        negatives = broadcast_list(negatives, len(prompts), "negative prompts")
        return Guidance(cond, self.encode_prompt(negatives).repeat(num_images_per_prompt), guidance_scale)

    def guided_predictions(
        self,
        xs: Sequence[torch.Tensor],
        t: torch.Tensor,
        guidances: Sequence[Guidance],
        self_cond: SelfCondition | None = None,
    ) -> list[torch.Tensor]:
        """The prediction for each ``(x, guidance)`` branch at model time ``t``, all in one denoiser call.

        A guided branch (``uncond`` given, scale != 1) is ``uncond + w (cond - uncond)``, computed on all channels
        for any batch size; an unguided one costs a single pass. CycleDiffusion runs its source and target chains
        as two branches of one call. With ``self_cond`` a self-conditioned denoiser reads each row's own previous
        x0 estimate (the conditional and unconditional rows theirs), and ``self_cond`` keeps this call's; without
        it the denoiser reads zeros, as it does for a share of its training steps.
        """
        denoiser = self.denoiser
        use_pooled = denoiser.takes_pooled
        dtype = next(denoiser.parameters()).dtype
        parts = [(x, e) for x, g in zip(xs, guidances) for e in ([g.uncond, g.cond] if g.guided else [g.cond])]
        x_in = torch.cat([x for x, _ in parts]).to(dtype)
        t_in = torch.cat([t] * len(parts))
        context = torch.cat([e.context for _, e in parts]).to(dtype)
        pooled = torch.cat([e.pooled for _, e in parts]).to(dtype) if use_pooled else None
        masks = [e.mask for _, e in parts]
        mask = None if any(m is None for m in masks) else torch.cat(masks)
        extra = {}
        tracked = self_cond is not None and denoiser.self_conditioned
        if tracked and self_cond.x0 is not None and self_cond.x0.shape == x_in.shape:
            extra["x_self_cond"] = self_cond.x0
        raw = denoiser(x_in, t_in, context, pooled, mask, **extra).float()
        if tracked:
            process = self.noise_process
            self_cond.x0 = process.to_x0_eps(raw, x_in.float(), process.path_time(t_in))[0].to(dtype)
        out = list(raw.split([x.shape[0] for x, _ in parts]))
        predictions = []
        for g in guidances:
            if g.guided:
                uncond, cond = out.pop(0), out.pop(0)
                predictions.append(uncond + g.scale * (cond - uncond))
            else:
                predictions.append(out.pop(0))
        return predictions

    def guided_model_fn(self, cond: PromptEmbeds, uncond: PromptEmbeds | None, guidance_scale: float) -> ModelFn:
        """``model_fn(x_t, t)`` for the noise process: :meth:`guided_predictions` of one branch; a self-conditioned
        denoiser reads its estimate of the previous call (one sampling run per ``model_fn``)."""
        guidance, state = Guidance(cond, uncond, guidance_scale), SelfCondition()
        return lambda x, t: self.guided_predictions([x], t, [guidance], state)[0]

    # ----------------------------------------------------------------- images
    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell (1 in pixel space)."""
        return 1 if self.vae is None else self.vae.downsample_factor

    @torch.no_grad()
    def latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents (or pass pixels through) to images in [-1, 1]."""
        if self.vae is None:
            return latents
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode_latents(latents.to(dtype)).float()

    @torch.no_grad()
    def pixels_to_latents(self, pixels: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """Encode images in [-1, 1] to scaled latents (a posterior sample; a list of generators draws one row
        each), or pass pixels through in pixel space."""
        if self.vae is None:
            return pixels.to(self.device, torch.float32)
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixels.to(self.device, dtype))
        z = posterior.mean + posterior.std * randn(posterior.mean.shape, generator, self.device, dtype)
        return self.vae.scale_latents(z).float()

    def image_latents(
        self, image: ImageInput, num_prompts: int, num_images_per_prompt: int, generator: Generator
    ) -> torch.Tensor:
        """Scaled latents of the input image(s), one row per output image (prompt-major).

        The posterior is sampled as diffusers does: the images once with a single generator, or each output
        row with its own generator when a list is given.
        """
        if image is None:
            raise ValueError("image is required: the picture to edit")
        latent_channels = self.denoiser.in_channels
        if isinstance(image, torch.Tensor) and self.vae is not None and image.shape[-3] == latent_channels != 3:
            latents = (image[None] if image.ndim == 3 else image).to(self.device, torch.float32)
            return expand_rows(latents, num_prompts, num_images_per_prompt)
        pixels = images_to_tensor(image, self.latent_factor)
        if pixels.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (or {latent_channels} for latents), got {pixels.shape[1]}")
        if isinstance(generator, (list, tuple)):
            return self.pixels_to_latents(expand_rows(pixels, num_prompts, num_images_per_prompt), generator)
        return expand_rows(self.pixels_to_latents(pixels, generator), num_prompts, num_images_per_prompt)

    def postprocess(self, latents: torch.Tensor, output_type: str) -> ImagePipelineOutput:
        """Latents -> ``pil`` | ``np`` | ``pt`` images in [0, 1] (or the ``latent`` tensor itself)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if output_type == "latent":
            return ImagePipelineOutput(latents)
        images = (self.latents_to_pixels(latents) / 2 + 0.5).clamp(0, 1).cpu()
        if output_type == "pt":
            return ImagePipelineOutput(images)
        array = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return ImagePipelineOutput(array)
        return ImagePipelineOutput(numpy_to_pil(array))
