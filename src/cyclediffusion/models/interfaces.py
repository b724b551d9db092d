"""What the pipelines and the trainer need of a denoiser and of a latent codec, declared as Protocols.

Our :class:`~cyclediffusion.models.UNet`, :class:`~cyclediffusion.models.DiT` and
:class:`~cyclediffusion.models.AutoencoderKL` provide them, and so do the adapters around diffusers' networks in
:mod:`cyclediffusion.integrations.diffusers`; callers read these properties, never a model's ``config``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x_t, model_time, context, pooled=None, context_mask=None) -> prediction`` of x_t's shape; a
    ``self_conditioned`` one also takes ``x_self_cond=``, its previous x0 estimate."""

    @property
    def in_channels(self) -> int:
        """Channels of ``x_t`` (and of the prediction)."""

    @property
    def sample_size(self) -> int:
        """Side of the inputs it was trained on, in latent cells."""

    @property
    def takes_pooled(self) -> bool:
        """Whether it uses the pooled text state (else ``pooled`` is ignored and may be None)."""

    @property
    def self_conditioned(self) -> bool:
        """Whether it reads its previous x0 estimate (``x_self_cond=``; absent means zeros)."""

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class ConfigDenoiser:
    """The :class:`Denoiser` properties of a network whose config has ``in_channels``, ``sample_size`` and
    ``pooled_dim``."""

    config: Any

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    @property
    def takes_pooled(self) -> bool:
        return self.config.pooled_dim is not None

    @property
    def self_conditioned(self) -> bool:
        return getattr(self.config, "self_condition", False)


@runtime_checkable
class LatentCodec(Protocol):
    """Images in [-1, 1] <-> diffusion latents: a posterior, its scaling, and the decoder."""

    @property
    def latent_channels(self) -> int:
        """Channels of a latent."""

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side."""

    def encode(self, x: torch.Tensor) -> Any:
        """The posterior over unscaled latents (with ``.mean`` and ``.std``)."""

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled posterior samples to diffusion latents."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents to images in [-1, 1]."""
