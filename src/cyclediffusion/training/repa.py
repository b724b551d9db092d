"""Representation alignment (REPA, Yu et al. 2024) for text-to-image training.

An intermediate layer of the denoiser, seen through a small trained projector, is pulled towards a frozen
encoder's features of the clean image: the loss is one minus their cosine similarity, averaged over the
positions of the denoiser's feature grid (the encoder's grid is average-pooled to it). The encoders are ones this
project trains: the VAE encoder (its features before the latent projection) or a captioner's image encoder
(its patch tokens). The denoiser's layer is the U-Net's middle block, or the DiT block a third of the way up.
The projector trains with the module and is never exported; the encoder is frozen and stays out of the module
tree, like the VAE.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..models import AutoencoderKL, DiT, UNet
from ..pipelines.caption import CaptionPipeline

REPA_ENCODERS = ("vae", "captioner")


def as_grid(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as it is; square token grids (B, N, C) as (B, C, sqrt N, sqrt N)."""
    if features.dim() == 4:
        return features
    b, n, c = features.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"REPA needs a square token grid, got {n} tokens")
    return features.transpose(1, 2).reshape(b, c, side, side)


def aligned_layer(denoiser: nn.Module) -> tuple[nn.Module, int]:
    """The denoiser layer whose output REPA aligns, and its channels."""
    if isinstance(denoiser, UNet):
        return denoiser.mid, denoiser.config.block_channels[-1]
    if isinstance(denoiser, DiT):
        return denoiser.blocks[max(0, len(denoiser.blocks) // 3 - 1)], denoiser.config.hidden_size
    raise ValueError(f"REPA knows the U-Net and the DiT, not {type(denoiser).__name__}")


class FrozenEncoder:
    """Target features of clean pixels in [-1, 1]: (B, D, h, w), no gradient. Never copied (EMA shares it)."""

    def __init__(self, kind: str, vae: nn.Module | None = None, captioner: CaptionPipeline | None = None) -> None:
        if kind not in REPA_ENCODERS:
            raise ValueError(f"unknown REPA encoder {kind!r}; choose from {', '.join(REPA_ENCODERS)}")
        if kind == "vae" and vae is None:
            raise ValueError("--repa-encoder vae needs a latent model (--vae)")
        if kind == "vae" and not isinstance(vae, AutoencoderKL):
            raise ValueError(f"--repa-encoder vae needs a VAE trained here, not {type(vae).__name__}")
        if kind == "captioner" and captioner is None:
            raise ValueError("--repa-encoder captioner needs --captioner")
        if kind == "captioner" and not isinstance(captioner, CaptionPipeline):
            raise ValueError("--repa-encoder captioner needs a captioner trained here (train-captioner)")
        self.kind = kind
        self.network = vae.encoder if kind == "vae" else captioner.captioner.encoder
        self.network.eval().requires_grad_(False)
        self.dim = self.network.norm_out.num_channels if kind == "vae" else self.network.config.width

    def __deepcopy__(self, memo: dict) -> FrozenEncoder:
        return self

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "captioner":
            return as_grid(self.network(pixels)).float()
        encoder = self.network
        h = encoder.conv_in(pixels)
        for level in encoder.levels:
            h = level(h)
        return encoder.mid(h).float()


class RepresentationAlignment(nn.Module):
    """The trained projector (1x1 convolutions, SiLU) and the loss; ``capture`` records the aligned layer."""

    def __init__(self, denoiser: nn.Module, target_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        layer, channels = aligned_layer(denoiser)
        object.__setattr__(self, "layer", layer)  # the denoiser's, not a submodule here (no second copy of it)
        hidden = hidden or max(channels, target_dim)
        self.projector = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
            nn.Conv2d(hidden, target_dim, 1),
        )  # fmt: skip
        self._captured: torch.Tensor | None = None

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Within the block, every forward pass of the aligned layer is recorded (the last one is kept)."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._captured = output

        handle = self.layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def loss(self, target: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` between the projected captured features and ``target`` (B, D, h, w), per position."""
        if self._captured is None:
            raise RuntimeError("REPA: nothing captured; run the denoiser inside capture()")
        features = self.projector(as_grid(self._captured).float())
        self._captured = None
        target = F.adaptive_avg_pool2d(target, features.shape[-2:])
        return 1 - F.cosine_similarity(features, target, dim=1).mean()
