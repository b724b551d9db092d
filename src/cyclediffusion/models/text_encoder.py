"""CLIP-style text encoder: causal pre-LN transformer over token ids, token states plus a pooled state.

Options for captions whose words must be bound to each other (an attribute to its noun): ``refiner_layers``
bidirectional blocks on top of the causal ones, so that every token state also sees the words after it;
``layer_mix``, token states that mix every block's output with learned weights instead of the last one; and
``mask_padding``, which reports the real tokens so that the denoiser's cross-attention ignores the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Configurable
from .layers import SelfAttentionBlock, init_transformer_weights


@dataclass
class TextEncoderConfig:
    """Sizes of :class:`TextEncoder`; ``eos_token_id`` marks where the pooled state is read."""

    vocab_size: int = 1024
    max_length: int = 77
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    eos_token_id: int = 2
    pad_token_id: int = 0
    projection_dim: int | None = None
    refiner_layers: int = 0
    layer_mix: bool = False
    mask_padding: bool = False


@dataclass
class TextEncoderOutput:
    """``hidden_states``: (B, L, width) after the final norm; ``pooled``: (B, pooled_dim); ``mask``: (B, L) bool,
    True for the real tokens (up to the first eos), when the encoder asks for padding to be ignored (else None)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None


class TextEncoder(nn.Module, Configurable):
    """Token + learned position embeddings, causal transformer blocks, final LayerNorm.

    The pooled state is the final state at each row's first ``eos_token_id`` (the last position
    when a row has none), optionally projected to ``projection_dim``. Because attention is causal,
    nothing after that eos (padding included) changes the pooled state or any earlier token state;
    the bidirectional refiner blocks attend to the real tokens only, so that stays true with them.
    """

    config_class = TextEncoderConfig

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(config.width, config.heads, config.mlp_ratio, causal=True) for _ in range(config.layers)
        )
        self.refiner = nn.ModuleList(
            SelfAttentionBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.refiner_layers)
        )
        depth = config.layers + config.refiner_layers
        self.layer_weights = nn.Parameter(torch.zeros(depth)) if config.layer_mix else None
        self.final_norm = nn.LayerNorm(config.width)
        self.projection = nn.Linear(config.width, config.projection_dim, bias=False) if config.projection_dim else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Normal(0, 0.02) embeddings and linear weights, zero biases, identity LayerNorms."""
        init_transformer_weights(self, self.position_embedding)

    @property
    def hidden_size(self) -> int:
        """Width of the per-token states (the cross-attention context dimension)."""
        return self.config.width

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled state."""
        return self.config.projection_dim or self.config.width

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of each row's first eos, or the last position for rows without one."""
        is_eos = input_ids == self.config.eos_token_id
        first = is_eos.int().argmax(dim=1)  # argmax returns the first maximal index
        last = torch.full_like(first, input_ids.shape[1] - 1)
        return torch.where(is_eos.any(dim=1), first, last)

    def forward(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        """Encode (B, L) token ids, L <= max_length."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.config.max_length}")
        eos = self.eos_positions(input_ids)
        real = torch.arange(length, device=input_ids.device)[None] <= eos[:, None]  # up to the first eos
        x = self.token_embedding(input_ids) + self.position_embedding[:length]
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        for block in self.refiner:
            x = block(x, mask=real)
            outputs.append(x)
        if self.layer_weights is not None:
            weights = self.layer_weights.softmax(0)
            x = sum(w * out for w, out in zip(weights, outputs))
        hidden = self.final_norm(x)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]
        if self.projection is not None:
            pooled = self.projection(pooled)
        return TextEncoderOutput(hidden_states=hidden, pooled=pooled, mask=real if self.config.mask_padding else None)
