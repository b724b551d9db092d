"""The networks. Modules only: nothing here knows how it is trained or noised."""

from __future__ import annotations

from .captioner import Captioner, CaptionerConfig, caption_loss
from .dit import DIT_SIZES, DiT, DiTConfig
from .interfaces import Denoiser, LatentCodec
from .text_encoder import TextEncoder, TextEncoderConfig, TextEncoderOutput
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = [
    "DIT_SIZES",
    "AutoencoderKL",
    "Captioner",
    "CaptionerConfig",
    "DiT",
    "DiTConfig",
    "DiagonalGaussian",
    "Denoiser",
    "LatentCodec",
    "TextEncoder",
    "TextEncoderConfig",
    "TextEncoderOutput",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "caption_loss",
]
