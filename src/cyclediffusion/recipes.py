"""Recipes: the named sizes of every network and the builders that turn plain arguments into models.

Training, the demo, the benchmarks and inference code build their networks here; nothing in this module
imports Lightning or the trainer.
"""

from __future__ import annotations

import math
from typing import Any

from .diffusion import NoiseProcess, create_noise_process
from .models import (
    DIT_SIZES,
    AutoencoderKL,
    Captioner,
    CaptionerConfig,
    DiT,
    DiTConfig,
    TextEncoder,
    TextEncoderConfig,
    UNet,
    UNetConfig,
    VAEConfig,
)
from .text import Tokenizer

# Guidance 2 / 3 / 4 on a 5-minute flow model of the demo: ShapesEval overall 0.49 / 0.51 / 0.52, single
# 0.76 / 0.88 / 0.90. The project's models store the guidance they were trained for in their exported folder;
# this is the value a run stores unless told otherwise.
DEFAULT_GUIDANCE = 4.0

DEFAULT_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a small purple square on the left",
    "a large orange triangle at the top",
    "two cyan circles",
    "a red square and a blue circle",
]

UNET_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"block_channels": (32, 64), "layers_per_block": 1, "attention_levels": (False, True)},
    "small": {"block_channels": (64, 128), "layers_per_block": 1, "attention_levels": (False, True)},
    "medium": {"block_channels": (64, 128), "layers_per_block": 2, "attention_levels": (True, True)},
    "base": {"block_channels": (128, 256, 256), "layers_per_block": 2, "attention_levels": (False, True, True)},
}
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "depth": 4, "num_heads": 4, "patch_size": 1},
    "small": {"hidden_size": 256, "depth": 8, "num_heads": 4, "patch_size": 1},
    # 2x2 patches: 16 tokens on 8x8 latents, wider to keep the capacity. Its training step at batch 64 costs about
    # 64% of tiny's on a 2-core CPU, where tiny's 64 tokens of width 128 are bound by elementwise work, not matmuls.
    "mini/2": {"hidden_size": 192, "depth": 4, "num_heads": 4, "patch_size": 2},
    **DIT_SIZES,
}
VAE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"block_channels": (16, 32, 64, 64), "layers_per_block": 1},
    "small": {"block_channels": (32, 64, 128, 128), "layers_per_block": 1},
    "base": {"block_channels": (64, 128, 256, 256), "layers_per_block": 2},
}
CAPTIONER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "encoder_layers": 1, "decoder_layers": 2, "heads": 4, "stem_channels": 16},
    "small": {"width": 128, "encoder_layers": 2, "decoder_layers": 2, "heads": 4, "stem_channels": 32},
    "base": {"width": 256, "encoder_layers": 4, "decoder_layers": 4, "heads": 8, "stem_channels": 64},
}
SIZES = {"unet": UNET_SIZES, "dit": DIT_PRESETS, "vae": VAE_SIZES, "captioner": CAPTIONER_SIZES}


def named_size(kind: str, size: str) -> dict[str, Any]:
    """The config fields of a named size, or a ``ValueError`` listing the known ones."""
    sizes = SIZES[kind]
    if size not in sizes:
        label = {"unet": "U-Net", "dit": "DiT", "vae": "VAE", "captioner": "captioner"}[kind]
        raise ValueError(f"unknown {label} size {size!r}; choose from {', '.join(sizes)}")
    return dict(sizes[size])


def build_noise_process(scheduler: str, **options: Any) -> NoiseProcess:
    """The noise process of a training recipe: ``ddpm`` (trailing timestep spacing; ``snr_gamma`` 0 is off) or
    ``flow``; ``options`` are fields of its config. None values keep the config's default."""
    options = {k: v for k, v in options.items() if v is not None}
    if scheduler == "ddpm":
        options.setdefault("timestep_spacing", "trailing")
        if options.get("snr_gamma") == 0:
            options["snr_gamma"] = None
    if scheduler not in ("ddpm", "flow"):
        raise ValueError(f"unknown scheduler {scheduler!r}; choose 'ddpm' or 'flow'")
    return create_noise_process(scheduler, **options)


def build_denoiser(
    backbone: str,
    size: str,
    *,
    in_channels: int,
    sample_size: int,
    context_dim: int,
    base_channels: int | None = None,
    pooled: bool = True,
    **overrides: Any,
) -> UNet | DiT:
    """A U-Net or DiT of a named size for ``in_channels`` x ``sample_size``^2 inputs and ``context_dim`` text states.

    ``overrides`` change single config fields (``depth=12``, ``num_heads=12``; heads given without a width keep the
    size's head width, so the width follows); ``base_channels`` sets the U-Net's first level and keeps the ratios of
    the later ones. With ``pooled`` the pooled text state (the context's width) joins the time embedding; without it
    the caption reaches the denoiser through cross-attention only.
    """
    common = {"in_channels": in_channels, "out_channels": in_channels, "sample_size": sample_size}
    common |= {"context_dim": context_dim, "pooled_dim": context_dim if pooled else None}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if backbone == "unet":
        spec = named_size("unet", size)
        if base_channels:
            first = spec["block_channels"][0]
            spec["block_channels"] = tuple(base_channels * c // first for c in spec["block_channels"])
        spec |= overrides
        groups = math.gcd(32, spec["block_channels"][0])
        return UNet(UNetConfig(**common, **spec, norm_groups=spec.pop("norm_groups", groups)))
    if backbone == "dit":
        if base_channels:
            raise ValueError("base channels are a U-Net option; the DiT's width is its hidden size")
        spec = named_size("dit", size) | {"gelu_approximate": "none"}  # exact GELU: faster on CPUs (DiTConfig)
        if "num_heads" in overrides and "hidden_size" not in overrides:  # heads alone keep the preset's head width
            spec["hidden_size"] = overrides["num_heads"] * (spec["hidden_size"] // spec["num_heads"])
        spec |= overrides
        if spec["hidden_size"] % spec["num_heads"]:
            raise ValueError(f"the DiT width {spec['hidden_size']} is not a multiple of its {spec['num_heads']} heads")
        if sample_size % spec["patch_size"]:
            raise ValueError(f"the DiT patch size {spec['patch_size']} does not divide the {sample_size} latent side")
        return DiT(DiTConfig(**common, **spec))
    raise ValueError(f"unknown backbone {backbone!r}; choose 'unet' or 'dit'")


def build_vae(size: str, downsample: int, latent_channels: int = 4) -> AutoencoderKL:
    """A VAE of a named size with ``downsample`` = 2, 4 or 8 (levels = log2(downsample) + 1)."""
    spec = named_size("vae", size)
    levels = int(math.log2(downsample)) + 1 if downsample > 0 else 0
    if 2 ** (levels - 1) != downsample or levels < 2:
        raise ValueError(f"VAE downsampling must be 2, 4 or 8, got {downsample}")
    chans = spec.pop("block_channels")[:levels]
    groups = math.gcd(32, chans[0])
    return AutoencoderKL(VAEConfig(block_channels=chans, norm_groups=groups, latent_channels=latent_channels, **spec))


def build_text_encoder(tokenizer: Tokenizer, width: int, layers: int, heads: int, **options: Any) -> TextEncoder:
    """A CLIP-style text encoder for ``tokenizer``'s vocabulary and length; ``options`` are further config fields
    (``refiner_layers``, ``layer_mix``, ``mask_padding``)."""
    return TextEncoder(
        TextEncoderConfig(
            vocab_size=tokenizer.vocab_size,
            max_length=tokenizer.max_length,
            width=width,
            layers=layers,
            heads=heads,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    )


def build_captioner(size: str, tokenizer: Tokenizer, image_size: int, patch_size: int | None = None) -> Captioner:
    """A captioner of a named size for ``tokenizer``; the patch size defaults to image_size / 8."""
    return Captioner(
        CaptionerConfig(
            image_size=image_size,
            patch_size=patch_size or max(1, image_size // 8),
            **named_size("captioner", size),
            vocab_size=tokenizer.vocab_size,
            max_length=tokenizer.max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
