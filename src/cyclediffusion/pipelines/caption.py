"""Captioning: images -> a trained :class:`~cyclediffusion.models.Captioner` -> token ids -> text.

A saved captioner is a pipeline folder like the text-to-image one::

    model/
      model_index.json      {"_class_name": "CaptionPipeline", "tokenizer": "Tokenizer", "captioner": "Captioner"}
      tokenizer/            tokenizer.json, config.json
      captioner/            config.json, model.safetensors

The captioner is always used with its own tokenizer: the pipeline refuses a pair that disagree on the
vocabulary or the special tokens, and :meth:`CaptionPipeline.loss` tokenizes captions itself, so a
caption can never be read with another model's token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..images import preprocess_image
from ..models.captioner import Captioner
from ..text import Tokenizer
from .storage import NotAPipelineError, find_pipeline, load_components, save_components

ImageInput = Image.Image | torch.Tensor | Sequence[Image.Image]


@dataclass
class CaptionOutput:
    """``captions``: one string per image; ``token_ids``: (B, L) the generated ids (``<bos>`` first)."""

    captions: list[str]
    token_ids: torch.Tensor


def check_compatible(tokenizer: Tokenizer, captioner: Captioner) -> None:
    """Raise ``ValueError`` unless ``captioner`` was built for ``tokenizer`` (vocabulary, special ids, length)."""
    c = captioner.config
    mine = (c.vocab_size, c.pad_token_id, c.bos_token_id, c.eos_token_id)
    theirs = (tokenizer.vocab_size, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if mine != theirs:
        raise ValueError(f"the captioner (vocab, pad, bos, eos = {mine}) was not built for this tokenizer ({theirs})")
    if tokenizer.max_length > c.max_length:
        raise ValueError(f"tokenizer max_length {tokenizer.max_length} exceeds the captioner's {c.max_length}")


def token_weights(decode, ids: torch.Tensor, words: frozenset[str], weight: float) -> torch.Tensor:
    """(B, L) weights of token ``ids``: ``weight`` where ``decode([id])`` is one of ``words``, else 1."""
    values = ids.unique().tolist()
    heavy = torch.tensor([decode([v]).strip().lower() in words for v in values], device=ids.device)
    lookup = torch.ones(max(values) + 1, device=ids.device)
    lookup[torch.tensor(values, device=ids.device)[heavy]] = weight
    return lookup[ids]


class CaptionPipeline:
    """``CaptionPipeline(tokenizer, captioner)``: ``pipe(images).captions``."""

    component_names = ("tokenizer", "captioner")

    def __init__(self, tokenizer: Tokenizer, captioner: Captioner) -> None:
        check_compatible(tokenizer, captioner)
        self.tokenizer = tokenizer
        self.captioner = captioner

    @property
    def device(self) -> torch.device:
        return self.captioner.lm_head.weight.device

    @property
    def image_size(self) -> int:
        return self.captioner.config.image_size

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> CaptionPipeline:
        """Move (and optionally cast) the captioner; returns self."""
        self.captioner.to(device=device, dtype=dtype)
        return self

    def eval(self) -> CaptionPipeline:
        self.captioner.eval()
        return self

    # ----------------------------------------------------------------- storage
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model_index.json``, ``tokenizer/`` and ``captioner/`` (safetensors + JSON)."""
        save_components(directory, type(self).__name__, {"tokenizer": self.tokenizer, "captioner": self.captioner})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> CaptionPipeline:
        """Load a folder written by :meth:`save_pretrained`, or a run folder holding one (never unpickles)."""
        directory = find_pipeline(directory)
        name, components = load_components(directory, device=device)
        tokenizer, captioner = components.get("tokenizer"), components.get("captioner")
        if not isinstance(tokenizer, Tokenizer) or not isinstance(captioner, Captioner):
            raise NotAPipelineError(f"{directory} holds a {name or 'pipeline'} without a captioner and its tokenizer")
        return cls(tokenizer, captioner).eval()

    # ----------------------------------------------------------------- use
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """PIL image(s) -> (B, 3, S, S) pixels in [-1, 1] on the device; tensors are taken as they are."""
        if isinstance(images, torch.Tensor):
            pixels = images if images.dim() == 4 else images[None]
        else:
            images = [images] if isinstance(images, Image.Image) else list(images)
            if not images:
                raise ValueError("no images to caption")
            pixels = torch.stack([preprocess_image(image, self.image_size) for image in images])
        return pixels.to(self.device)

    def token_ids(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, L) ids of ``captions`` under this captioner's tokenizer, on the device."""
        return self.tokenizer(list(captions)).input_ids.to(self.device)

    def loss(
        self,
        pixels: torch.Tensor,
        captions: Sequence[str],
        reduction: str = "mean",
        word_weights: tuple[frozenset[str], float] | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of ``captions`` given ``pixels`` (B, 3, H, W) in [-1, 1]; differentiable in the pixels.

        ``word_weights = (words, w)``: the tokens that spell one of ``words`` weigh ``w``, the others 1."""
        ids = self.token_ids(captions)
        weights = None if word_weights is None else token_weights(self.tokenizer.decode, ids[:, 1:], *word_weights)
        return self.captioner.loss(pixels, ids, reduction=reduction, token_weights=weights)

    @torch.no_grad()
    def __call__(self, images: ImageInput, num_beams: int = 1, max_length: int | None = None) -> CaptionOutput:
        """Caption PIL image(s) or a (B, 3, H, W) tensor in [-1, 1]: greedy, or beam search with ``num_beams``."""
        ids = self.captioner.generate(self.preprocess(images), max_length=max_length, num_beams=num_beams)
        return CaptionOutput(self.tokenizer.batch_decode(ids.cpu()), ids)
