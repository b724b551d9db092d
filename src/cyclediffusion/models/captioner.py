"""Image captioner: a conv + patch encoder over pixels and a causal transformer decoder that writes the caption.

The encoder turns an image in [-1, 1] into patch tokens (a conv stem, one ResBlock, a strided patch
convolution, fixed 2D sin-cos positions, bidirectional transformer blocks). The decoder reads token ids
with causal self-attention and cross-attends to the patch tokens; its logits at position i predict token
i + 1. Everything is differentiable with respect to the pixels, so a frozen captioner can hand a
caption loss back to whatever made the image (the cycle loss of the text-to-image training).

Token ids are those of :class:`~cyclediffusion.text.Tokenizer`: ``<bos>`` caption ``<eos>`` then
``<pad>`` up to the tokenizer's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Configurable
from .layers import Attention, Mlp, ResBlock, SelfAttentionBlock, init_transformer_weights, sincos_pos_embed_2d

REDUCTIONS = ("mean", "sum", "none")


@dataclass
class CaptionerConfig:
    """Sizes of :class:`Captioner` and the ids of its tokenizer's special tokens.

    ``image_size`` is the side the captioner is trained and used at (any multiple of ``patch_size``
    works, the positions being fixed sin-cos ones); ``max_length`` bounds the token sequence.
    """

    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4
    stem_channels: int = 32
    width: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    vocab_size: int = 1024
    max_length: int = 77
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % 4 or self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by 4 and by heads ({self.heads})")


def caption_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    pad_token_id: int = 0,
    reduction: str = "mean",
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-forced cross-entropy: ``logits[:, i]`` predicts ``input_ids[:, i + 1]``; padding targets are ignored.

    Each caption's loss is the mean over its own target tokens (the caption and its ``<eos>``), weighted by
    ``token_weights`` (B, L - 1) when given (a weighted mean).
    ``reduction``: ``mean`` over captions (every caption weighs the same, whatever its length),
    ``sum`` over captions, or ``none`` for the (B,) per-caption losses.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    targets = input_ids[:, 1:]
    mask = targets != pad_token_id
    token_loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    weights = mask.float() if token_weights is None else mask * token_weights.float()
    per_caption = (token_loss * weights).sum(1) / weights.sum(1).clamp(min=1e-8)
    if reduction == "none":
        return per_caption
    return per_caption.sum() if reduction == "sum" else per_caption.mean()


class DecoderBlock(nn.Module):
    """Pre-LN block: causal self-attention over the tokens, cross-attention to the image, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads, bias=True)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = Mlp(width, mlp_ratio)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), causal=True)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.mlp(self.norm3(x))


class ImageEncoder(nn.Module):
    """Pixels (B, C, H, W) -> patch tokens (B, H/p * W/p, width).

    No normalisation touches the raw pixels (a GroupNorm there would remove each image's mean colour,
    which captions talk about).
    """

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.conv_in = nn.Conv2d(config.in_channels, config.stem_channels, 3, padding=1)
        self.res = ResBlock(config.stem_channels, config.stem_channels, groups=8)
        self.patch = nn.Conv2d(config.stem_channels, config.width, config.patch_size, stride=config.patch_size)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.encoder_layers)
        )
        self.norm_out = nn.LayerNorm(config.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        if pixels.dim() != 4 or pixels.shape[-1] % p or pixels.shape[-2] % p:
            raise ValueError(f"pixels must be (B, C, H, W) with H and W multiples of {p}, got {tuple(pixels.shape)}")
        h = self.patch(self.res(F.silu(self.conv_in(pixels))))
        b, c, gh, gw = h.shape
        x = h.flatten(2).transpose(1, 2) + sincos_pos_embed_2d(c, gh, gw, h.device).to(h.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x)


class Captioner(nn.Module, Configurable):
    """Image-to-text model: :meth:`forward` gives next-token logits, :meth:`loss` the caption loss,
    :meth:`generate` greedy or beam-search captions (token ids; decode them with the tokenizer)."""

    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        self.blocks = nn.ModuleList(
            DecoderBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.decoder_layers)
        )
        self.norm_out = nn.LayerNorm(config.width)
        self.lm_head = nn.Linear(config.width, config.vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Normal(0, 0.02) linear and embedding weights with zero biases; small random positions."""
        init_transformer_weights(self, self.position_embedding)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, width) of images in [-1, 1]."""
        return self.encoder(pixels.to(self.lm_head.weight.dtype))

    def decode(self, memory: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, vocab) of the token after each of ``input_ids`` (B, L), given the patch tokens."""
        length = input_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.config.max_length}")
        x = self.token_embedding(input_ids) + self.position_embedding[:length]
        for block in self.blocks:
            x = block(x, memory)
        return self.lm_head(self.norm_out(x))

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, vocab): position i predicts token i + 1 of ``input_ids`` (teacher forcing)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != pixels.shape[0]:
            raise ValueError(f"need (B, L) input_ids for {pixels.shape[0]} images, got {tuple(input_ids.shape)}")
        return self.decode(self.encode_image(pixels), input_ids)

    def loss(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        reduction: str = "mean",
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of the captions ``input_ids`` given the images, padding ignored (see :func:`caption_loss`)."""
        logits = self(pixels, input_ids)
        return caption_loss(logits, input_ids, self.config.pad_token_id, reduction, token_weights)

    # ----------------------------------------------------------------- generation
    def _max_length(self, max_length: int | None) -> int:
        max_length = max_length or self.config.max_length
        if not 2 <= max_length <= self.config.max_length:
            raise ValueError(f"max_length must be in 2..{self.config.max_length}, got {max_length}")
        return max_length

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, max_length: int | None = None, num_beams: int = 1) -> torch.Tensor:
        """Caption ids (B, L <= max_length): ``<bos>``, the caption, ``<eos>``, then ``<pad>``.

        ``num_beams`` = 1 is greedy decoding; more keeps that many hypotheses (see :meth:`beam_search`).
        """
        if num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        if num_beams > 1:
            return self.beam_search(pixels, max_length, num_beams)
        max_length = self._max_length(max_length)
        memory = self.encode_image(pixels)
        c = self.config
        ids = torch.full((pixels.shape[0], 1), c.bos_token_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(pixels.shape[0], dtype=torch.bool, device=memory.device)
        for _ in range(max_length - 1):
            token = self.decode(memory, ids)[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, c.pad_token_id), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == c.eos_token_id
            if done.all():
                break
        return ids

    @torch.no_grad()
    def beam_search(self, pixels: torch.Tensor, max_length: int | None = None, num_beams: int = 4) -> torch.Tensor:
        """The most likely caption (summed token log-probabilities) found with ``num_beams`` hypotheses per image.

        A finished hypothesis (one that wrote ``<eos>``) is carried on with ``<pad>`` at no cost, so
        finished and open hypotheses compete on the same score; one beam gives greedy decoding.
        """
        max_length = self._max_length(max_length)
        c, b, k = self.config, pixels.shape[0], num_beams
        memory = self.encode_image(pixels).repeat_interleave(k, dim=0)
        device = memory.device
        ids = torch.full((b * k, 1), c.bos_token_id, dtype=torch.long, device=device)
        scores = torch.zeros(b, k, device=device)
        scores[:, 1:] = float("-inf")  # all beams start equal: keep one so the first step gives k distinct ones
        done = torch.zeros(b * k, dtype=torch.bool, device=device)
        carry = torch.full((c.vocab_size,), float("-inf"), device=device)
        carry[c.pad_token_id] = 0.0  # what a finished hypothesis may write next
        rows = torch.arange(b, device=device)[:, None] * k
        for _ in range(max_length - 1):
            logp = self.decode(memory, ids)[:, -1].float().log_softmax(-1)
            logp = torch.where(done[:, None], carry, logp)
            scores, flat = (scores[:, :, None] + logp.view(b, k, -1)).view(b, -1).topk(k, dim=1)
            source = (rows + torch.div(flat, c.vocab_size, rounding_mode="floor")).view(-1)
            token = (flat % c.vocab_size).view(-1)
            ids = torch.cat([ids[source], token[:, None]], dim=1)
            done = done[source] | (token == c.eos_token_id)
            if done.all():
                break
        best = scores.argmax(dim=1)
        return ids.view(b, k, -1)[torch.arange(b, device=device), best]
