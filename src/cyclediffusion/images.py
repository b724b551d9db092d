"""Image conversions and grids (PIL and numpy only: no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) floats in [0, 1] to PIL images."""
    images = (images * 255).round().astype(np.uint8)
    if images.shape[-1] == 1:
        return [Image.fromarray(im[..., 0], mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (B, C, H, W) images in [0, 1] into one (C, H', W') image, ``nrow`` per row."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i, image in enumerate(images):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = image.float().cpu()
    return grid


def save_image(image: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write a (C, H, W) tensor in [0, 1] as PNG, optionally enlarged ``scale`` times (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = numpy_to_pil(image.clamp(0, 1).permute(1, 2, 0).cpu().numpy()[None])[0]
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    pil.save(path)
    return path
