"""A text-conditioned U-Net denoiser: ResBlocks with a time embedding, self- and cross-attention.

Layout (as in latent diffusion): conv_in; per resolution level ``layers_per_block`` ResBlocks, each
followed by a :class:`SpatialTransformer` where the level has attention, then a downsampling conv
(not after the last level); a middle ResBlock-transformer-ResBlock; the levels in reverse with one more
ResBlock each, fed the matching skip activations; GroupNorm, SiLU and a zero-initialised conv_out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Configurable
from .interfaces import ConfigDenoiser
from .layers import (
    Attention,
    Downsample,
    FeedForward,
    ResBlock,
    TimestepEmbedder,
    Upsample,
    expand_timesteps,
    group_norm,
    run_block,
    sincos_pos_embed_2d,
)


@dataclass
class UNetConfig:
    """Sizes of a :class:`UNet`.

    ``attention_levels[i]`` says whether level ``i`` (of ``block_channels``) has a transformer after
    each ResBlock; the middle block always has one. Attention heads are ``channels // head_dim``.
    ``pooled_dim``, when set, adds a projection of the pooled text vector to the time embedding.
    """

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 32
    block_channels: tuple[int, ...] = (128, 256, 256)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (False, True, True)
    head_dim: int = 32
    context_dim: int = 256
    pooled_dim: int | None = None
    norm_groups: int = 32
    dropout: float = 0.0
    transformer_depth: int = 1
    coord_channels: bool = False  # two input channels with each cell's (y, x) in [-1, 1]: absolute position
    attention_positions: bool = False  # every transformer adds a learned map of 2-D sin-cos positions to its tokens
    self_condition: bool = False  # forward also takes the previous x0 estimate (zero-initialised input conv)

    def __post_init__(self) -> None:
        if len(self.attention_levels) != len(self.block_channels):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries for "
                f"{len(self.block_channels)} block_channels"
            )


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text tokens and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, residual around the whole (proj_out zeroed)."""

    def __init__(
        self, channels: int, heads: int, context_dim: int, depth: int = 1, groups: int = 32, positions: bool = False
    ) -> None:
        """``positions``: add ``pos_proj`` of the 2-D sin-cos embedding of each cell (zero-initialised, so the block
        starts as it would without it) to the tokens: attention then knows where each cell lies."""
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, channels)
        self.pos_proj = nn.Linear(channels, channels, bias=False) if positions else None
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        if self.pos_proj is not None:
            tokens = tokens + self.pos_proj(sincos_pos_embed_2d(c, h, w, x.device).to(tokens.dtype))
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class UNetBlock(nn.Module):
    """One step of the U-Net: an optional ResBlock, transformer and resampling layer, in that order."""

    def __init__(
        self,
        res: ResBlock | None = None,
        attn: SpatialTransformer | None = None,
        resample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.res is not None:
            h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h, context, context_mask)
        if self.resample is not None:
            h = self.resample(h)
        return h


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) with two channels appended: each cell's row and column, from -1 to 1 (CoordConv)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)[:, None].expand(h, w)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)[None, :].expand(h, w)
    return torch.cat([x, torch.stack([ys, xs]).expand(b, 2, h, w)], dim=1)


class UNet(nn.Module, Configurable, ConfigDenoiser):
    """Text-conditioned U-Net mapping noisy latents (B, C, H, W) to a prediction of the same size.

    H and W must be divisible by ``2 ** (len(block_channels) - 1)``.
    """

    config_class = UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute each block in the backward pass (training only)
        cfg = config
        chans = cfg.block_channels
        emb_dim = 4 * chans[0]
        self.time_embed = TimestepEmbedder(emb_dim)
        self.pooled_proj = nn.Linear(cfg.pooled_dim, emb_dim) if cfg.pooled_dim else None
        self.conv_in = nn.Conv2d(cfg.in_channels + (2 if cfg.coord_channels else 0), chans[0], 3, padding=1)
        self.self_cond_in = None  # no bias: a zero estimate adds exactly nothing
        if cfg.self_condition:
            self.self_cond_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1, bias=False)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, cfg.norm_groups, cfg.dropout)

        def attn(ch: int, enabled: bool = True) -> SpatialTransformer | None:
            if not enabled:
                return None
            heads = max(1, ch // cfg.head_dim)
            return SpatialTransformer(
                ch, heads, cfg.context_dim, cfg.transformer_depth, cfg.norm_groups, cfg.attention_positions
            )

        self.down = nn.ModuleList()
        skips, ch = [chans[0]], chans[0]
        for level, (out, use_attn) in enumerate(zip(chans, cfg.attention_levels)):
            for _ in range(cfg.layers_per_block):
                self.down.append(UNetBlock(res(ch, out), attn(out, use_attn)))
                ch = out
                skips.append(ch)
            if level < len(chans) - 1:
                self.down.append(UNetBlock(resample=Downsample(ch)))
                skips.append(ch)

        self.mid = UNetBlock(res(ch, ch), attn(ch))
        self.mid_out = res(ch, ch)

        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            out, use_attn = chans[level], cfg.attention_levels[level]
            for i in range(cfg.layers_per_block + 1):
                upsample = Upsample(out) if level > 0 and i == cfg.layers_per_block else None
                self.up.append(UNetBlock(res(ch + skips.pop(), out), attn(out, use_attn), upsample))
                ch = out

        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero the output conv, the self-conditioning input conv and every transformer's proj_out: each starts as
        the identity/zero map."""
        transformers = [m for m in self.modules() if isinstance(m, SpatialTransformer)]
        zeroed = [self.conv_out, *([self.self_cond_in] if self.self_cond_in is not None else [])]
        zeroed += [*(m.proj_out for m in transformers), *(m.pos_proj for m in transformers if m.pos_proj)]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        x_self_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B, C, H, W); ``t`` (B,) or scalar time in 0..1000; ``context`` (B, L, context_dim);
        ``pooled`` (B, pooled_dim), required when ``pooled_dim`` is set, ignored otherwise;
        ``context_mask`` (B, L) bool, True = attend; ``x_self_cond`` (B, C, H, W), the previous x0 estimate of a
        self-conditioned U-Net (None: zeros; ignored otherwise). Returns (B, out_channels, H, W)."""
        factor = 2 ** (len(self.config.block_channels) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"UNet input size {tuple(x.shape[-2:])} is not divisible by {factor}")
        emb = self.time_embed(expand_timesteps(t, x.shape[0], x.device))
        if self.pooled_proj is not None:
            if pooled is None:
                raise ValueError("this UNet has pooled_dim set: pass the pooled text embedding")
            emb = emb + self.pooled_proj(pooled.to(emb.dtype))

        h = self.conv_in(with_coordinates(x) if self.config.coord_channels else x)
        if self.self_cond_in is not None and x_self_cond is not None:
            h = h + self.self_cond_in(x_self_cond.to(x.dtype))
        skips = [h]
        checkpoint = self.gradient_checkpointing and self.training
        for block in self.down:
            h = run_block(block, checkpoint, h, emb, context, context_mask)
            skips.append(h)
        h = self.mid_out(run_block(self.mid, checkpoint, h, emb, context, context_mask), emb)
        for block in self.up:
            h = run_block(block, checkpoint, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))
