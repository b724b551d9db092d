"""A transformers Pix2Struct captioner (``Pix2StructForConditionalGeneration`` + its processor) for the cycle loss.

Seed ``000`` reads the drawings back with Pix2Struct. Its processor works on PIL images and numpy, which cuts the
gradient; :func:`flattened_patches` is the same computation in torch (per-image standardisation, the
aspect-preserving bilinear resize with antialiasing to the largest grid of patches that fits ``max_patches``, the
patch flattening, the 1-based row and column ids, the zero padding), differentiable in the pixels and equal to the
processor's ``flattened_patches`` (to 1e-4 on the same image, tested). :class:`Pix2StructCaptioner` then has the
interface of :class:`~cyclediffusion.pipelines.caption.CaptionPipeline` that the cycle loss calls, and its loss is
transformers' own (token cross-entropy, padding ignored). Weights are loaded from safetensors only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PIX2STRUCT_ARCHITECTURES = ("Pix2StructForConditionalGeneration",)


def is_pix2struct_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a transformers Pix2Struct model (its ``config.json`` says so)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return data.get("model_type") == "pix2struct" or bool(
        set(data.get("architectures") or ()) & {*PIX2STRUCT_ARCHITECTURES}
    )


def flattened_patches(
    pixels: torch.Tensor, max_patches: int, patch_size: tuple[int, int] = (16, 16), unbiased_std: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pix2Struct's model input of ``pixels`` (B, 3, H, W) in [-1, 1]: ``(flattened_patches, attention_mask)``, of
    shapes (B, max_patches, 2 + ph * pw * 3) and (B, max_patches).

    ``unbiased_std`` picks the standard deviation of transformers' torchvision processor (n - 1); the PIL one
    (used where torchvision is missing) divides by n.
    """
    ph, pw = patch_size
    x = (pixels.float() + 1) * 127.5  # the processor sees 0..255
    b, c, h, w = x.shape
    n = c * h * w
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, correction=1 if unbiased_std else 0)
    x = (x - mean) / std.clamp_min(1.0 / math.sqrt(n))
    scale = math.sqrt(max_patches * (ph / h) * (pw / w))
    rows = max(min(int(scale * h / ph), max_patches), 1)
    cols = max(min(int(scale * w / pw), max_patches), 1)
    x = F.interpolate(x, size=(rows * ph, cols * pw), mode="bilinear", align_corners=False, antialias=True)
    patches = F.unfold(x, (ph, pw), stride=(ph, pw)).reshape(b, c, ph, pw, rows * cols)
    patches = patches.permute(0, 4, 2, 3, 1).reshape(b, rows * cols, c * ph * pw)
    ids = torch.arange(rows * cols, device=x.device)
    row_ids = (ids // cols + 1).float()[None, :, None].expand(b, -1, 1)
    col_ids = (ids % cols + 1).float()[None, :, None].expand(b, -1, 1)
    out = F.pad(torch.cat([row_ids, col_ids, patches], dim=-1), (0, 0, 0, max_patches - rows * cols))
    return out, (out.sum(dim=-1) != 0).float()


class Pix2StructCaptioner:
    """``Pix2StructCaptioner(model, processor)``: the cycle loss's captioner, and ``pipe(images).captions``.

    ``captioner`` is the transformers model; images of any size are read (``image_size`` is None).
    """

    image_size = None

    def __init__(self, model: nn.Module, processor, max_patches: int | None = None) -> None:
        self.captioner = model
        self.processor = processor
        image_processor = processor.image_processor
        self.max_patches = max_patches or int(getattr(image_processor, "max_patches", 2048))
        size = image_processor.patch_size
        self.patch_size = (int(size["height"]), int(size["width"]))
        # transformers' PIL image processor standardises with the population std, its torchvision one with n - 1
        self.unbiased_std = "Pil" not in type(image_processor).__name__

    @property
    def device(self) -> torch.device:
        return next(self.captioner.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pix2StructCaptioner:
        self.captioner.to(device=device, dtype=dtype)
        return self

    def eval(self) -> Pix2StructCaptioner:
        self.captioner.eval()
        return self

    def inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        patches, mask = flattened_patches(pixels.to(self.device), self.max_patches, self.patch_size, self.unbiased_std)
        return {"flattened_patches": patches, "attention_mask": mask}

    def labels(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids of ``captions`` (the tokenizer's own special tokens), padding as -100."""
        tokens = self.processor.tokenizer(list(captions), padding=True, return_tensors="pt")
        return tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100).to(self.device)

    def loss(
        self,
        pixels: torch.Tensor,
        captions: Sequence[str],
        reduction: str = "mean",
        word_weights: tuple[frozenset[str], float] | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of ``captions`` given ``pixels`` in [-1, 1]: transformers' loss (``mean``: over every
        caption token of the batch), or one (weighted) mean per caption (``none``); differentiable in the pixels.
        ``word_weights`` as in :meth:`~cyclediffusion.pipelines.caption.CaptionPipeline.loss`."""
        from ..pipelines.caption import token_weights

        labels = self.labels(captions)
        out = self.captioner(**self.inputs(pixels), labels=labels)
        if reduction == "mean" and word_weights is None:
            return out.loss
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        per_token = F.cross_entropy(out.logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        weights = (labels != -100).float()
        if word_weights is not None:
            weights = weights * token_weights(self.processor.tokenizer.decode, labels.clamp_min(0), *word_weights)
        per_caption = (per_token * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-8)
        return per_caption if reduction == "none" else per_caption.mean()

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, max_new_tokens: int = 32, num_beams: int = 1):
        """Captions of (B, 3, H, W) ``pixels`` in [-1, 1]."""
        from ..pipelines.caption import CaptionOutput

        ids = self.captioner.generate(**self.inputs(pixels), max_new_tokens=max_new_tokens, num_beams=num_beams)
        return CaptionOutput(self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True), ids)


def load_pix2struct(path: str | Path, max_patches: int | None = None) -> Pix2StructCaptioner:
    """A Pix2Struct folder (model + processor, as ``save_pretrained`` writes them), from safetensors only."""
    try:
        from transformers import AutoProcessor, Pix2StructForConditionalGeneration
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("a Pix2Struct captioner needs: pip install 'cyclediffusion[hf]'") from err
    model = Pix2StructForConditionalGeneration.from_pretrained(str(path), use_safetensors=True)
    return Pix2StructCaptioner(model, AutoProcessor.from_pretrained(str(path)), max_patches)
