"""KL autoencoder (as in latent diffusion): images <-> diagonal-Gaussian latents, 2**(levels-1) times smaller.

Latents handed to the diffusion model are ``(z - shift_factor) * scaling_factor``; both factors are
measured on the training data with :func:`measure_latent_scaling` and stored in the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Configurable
from .layers import Downsample, ResBlock, SpatialSelfAttention, Upsample, group_norm

# The posterior's log-variance starts here (std 0.05) instead of at ~0 (std 1). With unit noise on latents whose
# mean is still small, the decoder cannot read them and settles on the average image: on plain backgrounds a
# 400-step VAE then drops the objects' hue (red and green vanish, yellow turns white). Starting almost
# deterministic, it learns colour from the first steps; the KL term still shapes the variance afterwards.
INITIAL_LOGVAR = -6.0


class DiagonalGaussian:
    """Diagonal Gaussian over latents from a (B, 2C, h, w) tensor of means and log-variances."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised sample ``mean + std * noise``."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over channels and pixels: shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class VAEConfig:
    """Sizes of :class:`AutoencoderKL`; one entry of ``block_channels`` per resolution level."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (64, 128, 256, 256)
    layers_per_block: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 1.0
    shift_factor: float = 0.0


class MidBlock(nn.Module):
    """ResBlock, optional spatial self-attention, ResBlock."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups=groups)
        self.attn = SpatialSelfAttention(channels, groups) if attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    """ResBlocks at one resolution, then an optional resampling layer."""

    def __init__(self, in_channels: int, channels: int, layers: int, groups: int, resample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(in_channels if i == 0 else channels, channels, groups=groups) for i in range(layers)
        )
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.resample(x)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> Gaussian parameters (B, 2 * latent, H / f, W / f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels, groups = config.block_channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        levels, previous = [], channels[0]
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            resample = nn.Identity() if last else Downsample(ch)
            levels.append(Level(previous, ch, config.layers_per_block, groups, resample))
            previous = ch
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(previous, groups, config.mid_attention)
        self.norm_out = group_norm(previous, groups)
        self.conv_out = nn.Conv2d(previous, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, latent, h, w) -> image (B, out, h * f, w * f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels, groups = tuple(reversed(config.block_channels)), config.norm_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid = MidBlock(channels[0], groups, config.mid_attention)
        levels, previous = [], channels[0]
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            resample = nn.Identity() if last else Upsample(ch)
            levels.append(Level(previous, ch, config.layers_per_block + 1, groups, resample))
            previous = ch
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(previous, groups)
        self.conv_out = nn.Conv2d(previous, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module, Configurable):
    """KL-regularised autoencoder: :meth:`encode` gives a :class:`DiagonalGaussian`, :meth:`decode` an image.

    Images are expected in [-1, 1] with sides divisible by :attr:`downsample_factor`.
    """

    config_class = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if not config.block_channels:
            raise ValueError("block_channels must name at least one level")
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        with torch.no_grad():  # start nearly deterministic (see INITIAL_LOGVAR)
            self.quant_conv.bias[config.latent_channels :].fill_(INITIAL_LOGVAR)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """How many pixels per latent along each side."""
        return 2 ** (len(self.config.block_channels) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior over latents for images (B, in_channels, H, W)."""
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the VAE factor {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from unscaled latents (B, latent_channels, h, w)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior; the latent is a sample, or the mean if not ``sample_posterior``."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Diffusion latents ``(z - shift_factor) * scaling_factor``; z is the mean if not ``sample``."""
        posterior = self.encode(x)
        return self.scale_latents(posterior.sample(generator) if sample else posterior.mode())

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior samples to diffusion latents: ``(z - shift_factor) * scaling_factor``."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from diffusion latents: undo the scaling of :meth:`encode_latents`, then decode."""
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)


@torch.no_grad()
def measure_latent_scaling(
    vae: AutoencoderKL,
    batches: Iterable[torch.Tensor],
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` = (1 / std, mean) of the latents of ``batches`` over all elements.

    With these stored in ``vae.config``, :meth:`AutoencoderKL.encode_latents` gives latents with zero
    mean and unit std on this data. Latents are posterior samples, or means when ``sample`` is off.
    """
    parameter = next(vae.parameters())
    was_training = vae.training
    vae.eval()
    total, total_sq, count = 0.0, 0.0, 0
    try:
        for images in batches:
            posterior = vae.encode(images.to(parameter.device, parameter.dtype))
            z = (posterior.sample(generator) if sample else posterior.mode()).double()
            total += z.sum().item()
            total_sq += z.pow(2).sum().item()
            count += z.numel()
    finally:
        vae.train(was_training)
    if count < 2:
        raise ValueError("measure_latent_scaling needs at least two latent values")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    if var == 0.0:
        raise ValueError("latents have zero variance; cannot measure a scaling factor")
    return 1.0 / math.sqrt(var), mean
