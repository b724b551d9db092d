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


ImageInput = Image.Image | np.ndarray | torch.Tensor | list
"""A PIL image, a (H, W, 3) or (B, H, W, 3) array, a (3, H, W) or (B, C, H, W) tensor, or a list of them."""


def images_to_tensor(image: ImageInput, multiple: int = 1) -> torch.Tensor:
    """Images as one (B, C, H, W) float tensor, with diffusers' conventions for ranges.

    PIL images are resized down to a multiple of ``multiple`` (Lanczos, as diffusers does) and mapped to
    [-1, 1]; arrays (uint8, or floats in [0, 1]) are mapped to [-1, 1]; tensors in [0, 1] are mapped to
    [-1, 1] and tensors with negative values are taken as already in [-1, 1] (or as latents: the caller
    tells them apart by their channels). Every image of a list must have the same size.
    """
    items = image if isinstance(image, list) else [image]
    if not items:
        raise ValueError("image: got an empty list")
    tensors = []
    for item in items:
        if isinstance(item, Image.Image):
            w, h = (side - side % multiple for side in item.size)
            if w < 1 or h < 1:
                raise ValueError(f"image of {item.size[0]}x{item.size[1]} is smaller than {multiple} pixels")
            if (w, h) != item.size:
                item = item.resize((w, h), Image.LANCZOS)
            tensors.append(pil_to_tensor(item)[None])
        elif isinstance(item, np.ndarray):
            array = item.astype(np.float32) / 255.0 if item.dtype == np.uint8 else item.astype(np.float32)
            array = array[None] if array.ndim == 3 else array
            if array.ndim != 4 or array.shape[-1] not in (1, 3):
                raise ValueError(f"image arrays must be (H, W, 3) or (B, H, W, 3), got {item.shape}")
            tensors.append(torch.from_numpy(array).permute(0, 3, 1, 2) * 2 - 1)
        elif isinstance(item, torch.Tensor):
            tensor = item.detach().float()
            tensor = tensor[None] if tensor.ndim == 3 else tensor
            if tensor.ndim != 4:
                raise ValueError(f"image tensors must be (C, H, W) or (B, C, H, W), got {tuple(item.shape)}")
            tensors.append(tensor if tensor.min() < 0 else tensor * 2 - 1)
        else:
            raise TypeError(f"image must be a PIL image, numpy array or tensor (or a list), got {type(item).__name__}")
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes in one batch: {sorted(shapes)}")
    return torch.cat([t.cpu() for t in tensors])
