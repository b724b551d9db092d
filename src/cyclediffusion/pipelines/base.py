"""What every pipeline shares: components, prompt encoding, guided prediction, image conversion, storage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from ..diffusion.base import ModelFn
from ..images import numpy_to_pil
from .storage import load_components, save_components

P = TypeVar("P", bound="DiffusionPipeline")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class ImagePipelineOutput:
    """``images``: a list of PIL images, a (B, H, W, 3) float array in [0, 1], or a (B, 3, H, W) tensor."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


@dataclass
class PromptEmbeds:
    """Encoded prompts: per-token states for cross-attention and the pooled vector."""

    context: torch.Tensor
    pooled: torch.Tensor

    def repeat(self, n: int) -> PromptEmbeds:
        """Each prompt ``n`` times in a row (for ``num_images_per_prompt``)."""
        return PromptEmbeds(self.context.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))


def as_list(text: str | Sequence[str], name: str) -> list[str]:
    """A prompt or list of prompts as a non-empty list."""
    items = [text] if isinstance(text, str) else list(text)
    if not items or not all(isinstance(t, str) for t in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return items


class DiffusionPipeline:
    """Holds the components, moves them, saves and loads them.

    Subclasses name their components in ``component_names`` (constructor arguments, in order).
    """

    component_names: tuple[str, ...] = ("tokenizer", "text_encoder", "vae", "denoiser", "noise_process")

    def __init__(self, **components: Any) -> None:
        for name in self.component_names:
            setattr(self, name, components.get(name))

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

    # ----------------------------------------------------------------- storage
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model_index.json`` and one folder per component (config.json + model.safetensors)."""
        save_components(directory, type(self).__name__, self.components)

    @classmethod
    def from_pretrained(cls: type[P], directory: str | Path, device: str | torch.device | None = None) -> P:
        """Load a pipeline saved by :meth:`save_pretrained` (never unpickles)."""
        _, components = load_components(directory, device=device)
        missing = [n for n in cls.component_names if n not in components]
        if missing:
            raise ValueError(f"{directory} lacks component(s) {', '.join(missing)} needed by {cls.__name__}")
        return cls(**{n: components[n] for n in cls.component_names}).eval()

    # ----------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> PromptEmbeds:
        """Token states and pooled vectors of the prompts."""
        ids = self.tokenizer(prompts).input_ids.to(self.device)
        out = self.text_encoder(ids)
        return PromptEmbeds(out.hidden_states, out.pooled)

    def guided_model_fn(self, cond: PromptEmbeds, uncond: PromptEmbeds | None, guidance_scale: float) -> ModelFn:
        """``model_fn(x_t, t)`` for the noise process, with classifier-free guidance in one batched call.

        With ``uncond`` given and ``guidance_scale != 1`` the prediction is
        ``uncond + w (cond - uncond)``, computed on all channels and any batch size; else plain ``cond``.
        """
        denoiser = self.denoiser
        use_pooled = getattr(denoiser.config, "pooled_dim", None) is not None
        dtype = next(denoiser.parameters()).dtype
        guided = uncond is not None and guidance_scale != 1.0
        if guided:
            context = torch.cat([uncond.context, cond.context])
            pooled = torch.cat([uncond.pooled, cond.pooled])
        else:
            context, pooled = cond.context, cond.pooled

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in, t_in = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
            out = denoiser(x_in.to(dtype), t_in, context.to(dtype), pooled.to(dtype) if use_pooled else None)
            out = out.float()
            if not guided:
                return out
            out_uncond, out_cond = out.chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)

        return model_fn

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
    def pixels_to_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode images in [-1, 1] to scaled latents (posterior sample), or pass pixels through."""
        if self.vae is None:
            return pixels.float()
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode_latents(pixels.to(self.device, dtype), generator=generator).float()

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
