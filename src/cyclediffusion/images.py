"""Image conversions and grids (PIL and numpy only: no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) floats in [0, 1] to PIL images."""
    images = (images * 255).round().astype(np.uint8)
    if images.shape[-1] == 1:
        return [Image.fromarray(im[..., 0], mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """The one normalisation every image gets (training, captioning, editing): EXIF orientation applied, 16/32-bit
    greyscale scaled to 8 bits, transparent pixels composited on white, then RGB."""
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith(("I", "F")):  # 16/32-bit greyscale: scale to 8 bits
        values = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def square_uint8(image: Image.Image, size: int) -> np.ndarray:
    """uint8 (3, size, size): :func:`to_rgb`, then the centred square of the short side resampled to ``size``."""
    image = to_rgb(image)
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def uint8_to_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels as float32 in [-1, 1]."""
    return torch.from_numpy(pixels).float().div_(127.5).sub_(1.0)


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """RGB float32 (3, size, size) in [-1, 1]: short side resized to ``size`` (bicubic), centre-cropped; the input
    normalised by :func:`to_rgb`. Training data and the captioner both see images through this function."""
    return uint8_to_float(square_uint8(image, size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (normalised by :func:`to_rgb`) as a (3, H, W) float tensor in [-1, 1], at its own size."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
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


def open_image(path: str | Path) -> Image.Image:
    """The image at ``path`` (loaded), or a ``FileNotFoundError`` / ``ValueError`` naming the file."""
    from PIL import UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except UnidentifiedImageError as err:
        raise ValueError(f"{path} is not an image PIL can read") from err


def save_images(images: torch.Tensor, out: Path, nrow: int, scale: int = 1) -> None:
    """One PNG, or a grid at ``out`` and each image beside it (``out_0.png``, ...); says what it wrote."""
    out = Path(out)
    if len(images) == 1:
        save_image(images[0], out, scale=scale)
    else:
        save_image(make_grid(images, nrow=nrow), out, scale=scale)
        for i, image in enumerate(images):
            save_image(image, out.with_name(f"{out.stem}_{i}{out.suffix}"), scale=scale)
    print(f"wrote {out}" + (f" and {len(images)} single images beside it" if len(images) > 1 else ""))
