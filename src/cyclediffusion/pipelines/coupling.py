"""Attention coupling for editing (prompt-to-prompt, Hertz et al. 2022): the target branch reuses the source branch's
attention weights, so that the edit keeps the source's layout.

In each coupled denoiser call the source and target branches are rows of one batch. For the first
``cross_steps`` share of the steps, every cross-attention layer gives the target's conditional rows the source's
weights for the caption tokens the two prompts share (aligned by a diff of their token ids, so "a red circle" and
"a blue circle" share "a" and "circle" but not the colour); for the first ``self_steps`` share, the self-attention
weights of the target rows are the source's outright. The unconditional rows (the empty prompt) are left alone.
It works through :attr:`~cyclediffusion.models.layers.Attention.processor` in the U-Net and the DiT; the models'
maths elsewhere is untouched, and without coupling they run ``scaled_dot_product_attention`` as ever.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.layers import Attention, attention_weights


@dataclass
class AttentionCoupling:
    """How much of the edit couples the branches: ``cross_steps`` and ``self_steps`` are shares of the steps run
    (from the noisy end), each in [0, 1]."""

    cross_steps: float = 0.8
    self_steps: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cross_steps", "self_steps"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"coupling {name} is a share of the steps in [0, 1], got {getattr(self, name)}")


def token_map(source_ids: Sequence[int], target_ids: Sequence[int]) -> torch.Tensor:
    """For each target token position, the source position holding the same token in the aligned diff, else -1."""
    out = torch.full((len(target_ids),), -1, dtype=torch.long)
    matcher = difflib.SequenceMatcher(a=list(source_ids), b=list(target_ids), autojunk=False)
    for block in matcher.get_matching_blocks():
        out[block.b : block.b + block.size] = torch.arange(block.a, block.a + block.size)
    return out


class CouplingProcessor:
    """The attention processor of a coupled edit. ``source_rows`` and ``target_rows`` (index tensors of equal
    length) say which rows of the denoiser batch are the two branches' conditional rows; ``maps`` (rows, L) the
    token alignment of each pair; ``cross`` / ``self_`` whether this step couples cross / self-attention."""

    def __init__(self, maps: torch.Tensor) -> None:
        self.maps = maps
        self.source_rows: torch.Tensor | None = None
        self.target_rows: torch.Tensor | None = None
        self.cross = self.self_ = False

    def __call__(
        self,
        attn: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        couple = self.cross if attn.is_cross else self.self_
        if not couple or self.source_rows is None:
            return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        weights = attention_weights(q, k, attn_mask, causal)
        src, tgt = weights[self.source_rows], weights[self.target_rows]
        if attn.is_cross:
            maps = self.maps.to(q.device)[:, None, None, :].expand_as(tgt)  # (rows, heads, N, L)
            shared = maps >= 0
            tgt = torch.where(shared, src.gather(-1, maps.clamp_min(0)), tgt)
        else:
            tgt = src
        weights = weights.index_copy(0, self.target_rows, tgt)
        return (weights @ v.float()).to(v.dtype)


@contextmanager
def coupled(denoiser: nn.Module, processor: CouplingProcessor) -> Iterator[CouplingProcessor]:
    """Within the block every attention layer of ``denoiser`` runs through ``processor``."""
    layers = [m for m in denoiser.modules() if isinstance(m, Attention)]
    if not layers:
        name = type(denoiser).__name__
        joint = getattr(getattr(denoiser, "config", None), "joint_text", False)
        why = " (its MM-DiT blocks attend to image and text in one joint attention)" if joint else ""
        raise ValueError(f"attention coupling needs this project's attention layers; {name} has none{why}")
    previous = [layer.processor for layer in layers]
    for layer in layers:
        layer.processor = processor
    try:
        yield processor
    finally:
        for layer, before in zip(layers, previous):
            layer.processor = before
