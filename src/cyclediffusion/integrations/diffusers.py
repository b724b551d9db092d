"""Stable Diffusion components from ``diffusers`` / ``transformers`` inside this project's pipelines.

Thin adapters give diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` and transformers' ``CLIPTextModel``
and ``CLIPTokenizer`` the interfaces our pipelines call; a ``DDIMScheduler`` becomes the equivalent
:class:`~cyclediffusion.diffusion.GaussianDiffusion`. No weights are converted. This module is the only place in
the library that imports diffusers or transformers (``pip install 'cyclediffusion[hf]'``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..diffusion import GaussianConfig, GaussianDiffusion
from ..models.text_encoder import TextEncoderOutput

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


class DiffusersUNet(nn.Module):
    """``UNet2DConditionModel`` as a :class:`~cyclediffusion.models.Denoiser` (it takes no pooled state)."""

    takes_pooled = False
    self_conditioned = False

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def sample_size(self) -> int:
        return self.unet.config.sample_size

    def forward(self, x, t, context, pooled=None, context_mask=None) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample


class DiffusersVAE(nn.Module):
    """diffusers' ``AutoencoderKL`` as a :class:`~cyclediffusion.models.LatentCodec`."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def config_dict(self) -> dict[str, Any]:
        """diffusers' config (what the latent cache keys on, with the weights)."""
        return {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor):
        """The posterior (``.mean``, ``.std``)."""
        return self.vae.encode(x).latent_dist

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample


class CLIPTextEncoder(nn.Module):
    """``CLIPTextModel``: token states for cross-attention (``last_hidden_state``) and the pooled state."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        out = self.text_encoder(input_ids)
        return TextEncoderOutput(hidden_states=out.last_hidden_state, pooled=out.pooler_output)


@dataclass
class CLIPTokens:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class CLIPTokenizerAdapter:
    """``CLIPTokenizer`` padding to its ``model_max_length`` as Stable Diffusion pipelines do."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str]) -> CLIPTokens:
        out = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return CLIPTokens(out.input_ids, out.attention_mask)

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` before truncation, the start and end tokens included."""
        return len(self.tokenizer(text, truncation=False).input_ids)


def noise_process_from_scheduler(scheduler: Any) -> GaussianDiffusion:
    """The :class:`GaussianDiffusion` that takes the same DDIM steps as ``scheduler`` (a DDIM/DDPM scheduler)."""
    c = scheduler.config
    unsupported = {
        "trained_betas": getattr(c, "trained_betas", None) is not None,
        "clip_sample": bool(getattr(c, "clip_sample", False)),
        "thresholding": bool(getattr(c, "thresholding", False)),
        "rescale_betas_zero_snr": bool(getattr(c, "rescale_betas_zero_snr", False)),
    }
    if any(unsupported.values()):
        names = ", ".join(k for k, v in unsupported.items() if v)
        raise ValueError(f"scheduler options not supported for latent diffusion here: {names} (set them off)")
    if c.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unsupported beta schedule {c.beta_schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
    process = GaussianDiffusion(
        GaussianConfig(
            num_train_timesteps=c.num_train_timesteps,
            beta_schedule=BETA_SCHEDULES[c.beta_schedule],
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            prediction_type=c.prediction_type,
            timestep_spacing=getattr(c, "timestep_spacing", "leading"),
            steps_offset=getattr(c, "steps_offset", 0),
            set_alpha_to_one=getattr(c, "set_alpha_to_one", True),
        )
    )
    if not torch.allclose(process.alphas_cumprod.float(), scheduler.alphas_cumprod.float(), atol=1e-6):
        raise ValueError("could not reproduce the scheduler's noise schedule")
    return process


def with_steps_offset_one(scheduler: Any) -> Any:
    """``scheduler``, or a copy with ``steps_offset`` 1 (and a warning) when its config says otherwise: the fix-up
    that diffusers' Stable Diffusion and CycleDiffusion pipelines apply to outdated configs in their constructors
    (they rewrite the scheduler's config in place; the caller's scheduler is left alone here)."""
    offset = getattr(scheduler.config, "steps_offset", 1)
    if offset == 1:
        return scheduler
    warnings.warn(
        f"the scheduler config has steps_offset={offset}; using 1 as diffusers' Stable Diffusion pipelines do "
        "(update scheduler_config.json to silence this)",
        stacklevel=3,
    )
    return type(scheduler).from_config({**dict(scheduler.config), "steps_offset": 1})


def wrap_stable_diffusion(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any) -> dict[str, Any]:
    """Our pipeline components around Stable Diffusion's (the scheduler fixed up by :func:`with_steps_offset_one`)."""
    scheduler = with_steps_offset_one(scheduler)
    return {
        "tokenizer": CLIPTokenizerAdapter(tokenizer),
        "text_encoder": CLIPTextEncoder(text_encoder),
        "vae": DiffusersVAE(vae),
        "denoiser": DiffusersUNet(unet),
        "noise_process": noise_process_from_scheduler(scheduler),
    }


def is_diffusers_pipeline(path: str | Path) -> bool:
    """Whether ``path`` is a folder saved by diffusers (its ``model_index.json`` names a diffusers version)."""
    index = Path(path) / "model_index.json"
    return index.is_file() and "_diffusers_version" in json.loads(index.read_text())


def load_stable_diffusion_parts(name_or_path: str | Path) -> dict[str, Any]:
    """diffusers' and transformers' own ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and a DDIM ``scheduler``
    of a Stable Diffusion folder (or hub name), from safetensors weights only."""
    try:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("loading diffusers models needs: pip install 'cyclediffusion[hf]'") from err
    path = str(name_or_path)
    kwargs = {"use_safetensors": True}
    return {
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs),
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs),
        "scheduler": DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
    }


def load_stable_diffusion(name_or_path: str | Path) -> dict[str, Any]:
    """Load a Stable Diffusion folder (or hub name) with diffusers' and transformers' own loaders (safetensors
    weights only) and wrap it; a DDIM scheduler is built from its scheduler config."""
    return wrap_stable_diffusion(**load_stable_diffusion_parts(name_or_path))


def save_stable_diffusion(pipe: Any, scheduler: Any, directory: str | Path) -> None:
    """Write the Stable Diffusion parts inside ``pipe`` (a pipeline of this project around them, e.g. after
    fine-tuning) as a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads (safetensors)."""
    from diffusers import StableDiffusionPipeline

    parts = {
        "vae": pipe.vae.vae,
        "text_encoder": pipe.text_encoder.text_encoder,
        "tokenizer": pipe.tokenizer.tokenizer,
        "unet": pipe.denoiser.unet,
    }
    sd = StableDiffusionPipeline(
        **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.save_pretrained(directory, safe_serialization=True)
