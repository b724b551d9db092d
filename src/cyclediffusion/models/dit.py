"""Diffusion Transformer (Peebles & Xie, 2023) conditioned on text.

The image is cut into patches with fixed 2D sin-cos positions; every block modulates its
self-attention and MLP with shift/scale/gate from c = time embedding + projected pooled text
(adaLN-Zero) and cross-attends to the text tokens in between. Modulation, the cross-attention
output and the final layer start at zero, so the untrained model outputs exactly 0. With
``joint_text`` the blocks are MM-DiT blocks (:class:`JointDiTBlock`) instead: the text tokens get a
stream of their own and image and text attend jointly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Configurable
from .interfaces import ConfigDenoiser
from .layers import (
    Attention,
    Mlp,
    TimestepEmbedder,
    expand_timesteps,
    run_block,
    scaled_dot_product_attention,
    sincos_pos_embed_2d,
)


@dataclass
class DiTConfig:
    """Sizes of a :class:`DiT`; ``pooled_dim``, when set, adds the projected pooled text to c."""

    sample_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    context_dim: int = 256
    pooled_dim: int | None = None
    joint_text: bool = False
    """MM-DiT blocks (Esser et al. 2024, Stable Diffusion 3) instead of cross-attention: the text tokens run through
    every block in a stream of their own weights, and image and text tokens attend to each other in one attention."""
    self_condition: bool = False
    """Self-conditioning (Chen et al. 2023, Analog Bits): ``forward`` also takes the denoiser's previous x0 estimate
    (``x_self_cond``, zeros when absent), embedded by its own zero-initialised patch embedding."""
    gelu_approximate: str = "tanh"
    """The MLPs' GELU: ``"tanh"`` as in the DiT paper (and models saved before this field), or ``"none"``, the exact
    form, which the recipes choose: in bf16 on a CPU its backward is several times faster (the demo's DiT trains
    14% faster) and the two differ by less than 5e-4."""


DIT_SIZES: dict[str, dict[str, Any]] = {
    f"DiT-{name}/{patch}": dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch)
    for name, (hidden, depth, heads) in {
        "S": (384, 12, 6),
        "B": (768, 12, 12),
        "L": (1024, 24, 16),
        "XL": (1152, 28, 16),
    }.items()
    for patch in (2, 4)
}
"""Named sizes: ``DiT-{S,B,L,XL}/{2,4}`` (hidden size, depth, heads and patch size)."""


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with (B, 1, D) shift and scale."""
    return torch.addcmul(shift, x, 1 + scale)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the text tokens, adaLN-Zero MLP."""

    def __init__(
        self, hidden: int, heads: int, context_dim: int, mlp_ratio: float = 4.0, gelu_approximate: str = "tanh"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, bias=True)
        self.norm_cross = nn.LayerNorm(hidden, eps=1e-6)
        self.cross_attn = Attention(hidden, heads, context_dim=context_dim, bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio, gelu_approximate)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JointDiTBlock(nn.Module):
    """MM-DiT block: image and text tokens each have adaLN-Zero-modulated attention projections and an MLP of their
    own, and attend jointly over the concatenated sequence (padding keys masked). The ``last`` block updates only
    the image tokens (its text stream keeps just what the image tokens read)."""

    def __init__(
        self, hidden: int, heads: int, mlp_ratio: float = 4.0, gelu_approximate: str = "tanh", last: bool = False
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"attention width {hidden} is not divisible by {heads} heads")
        self.heads, self.last = heads, last
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio, gelu_approximate)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.text_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.text_qkv = nn.Linear(hidden, 3 * hidden)
        self.text_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, (2 if last else 6) * hidden))
        if not last:
            self.text_proj = nn.Linear(hidden, hidden)
            self.text_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.text_mlp = Mlp(hidden, mlp_ratio, gelu_approximate)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, N, D) image tokens, ``text`` (B, L, D) text tokens, ``text_mask`` (B, L) bool, True = attend.
        Returns both streams."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        text_mod = self.text_adaLN_modulation(c)[:, None].chunk(2 if self.last else 6, dim=-1)
        qkv = torch.cat(
            [self.qkv(modulate(self.norm1(x), shift1, scale1)),
             self.text_qkv(modulate(self.text_norm1(text), text_mod[0], text_mod[1]))], dim=1,
        )  # fmt: skip
        b, n = x.shape[:2]
        q, k, v = qkv.view(b, qkv.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None
        if text_mask is not None:
            mask = torch.cat([text_mask.new_ones(b, n), text_mask], dim=1).to(torch.bool)[:, None, None, :]
        out = scaled_dot_product_attention(q, k, v, mask).transpose(1, 2).reshape(b, qkv.shape[1], -1)
        x = x + gate1 * self.proj(out[:, :n])
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        if self.last:
            return x, text
        _, _, text_gate1, text_shift2, text_scale2, text_gate2 = text_mod
        text = text + text_gate1 * self.text_proj(out[:, n:])
        return x, text + text_gate2 * self.text_mlp(modulate(self.text_norm2(text), text_shift2, text_scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) and a linear map from each token to its patch of outputs."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module, Configurable, ConfigDenoiser):
    """Text-conditioned Diffusion Transformer; any H, W divisible by ``patch_size`` works."""

    config_class = DiTConfig

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute each block in the backward pass (training only)
        cfg = config
        hidden, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, hidden, p, stride=p)
        self.self_cond_embedder = None  # no bias: a zero estimate adds exactly nothing
        if cfg.self_condition:
            self.self_cond_embedder = nn.Conv2d(cfg.in_channels, hidden, p, stride=p, bias=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.pooled_embedder = nn.Linear(cfg.pooled_dim, hidden) if cfg.pooled_dim else None
        grid = cfg.sample_size // p
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, grid, grid), persistent=False)
        self.context_embedder = nn.Linear(cfg.context_dim, hidden) if cfg.joint_text else None
        self.blocks = nn.ModuleList(
            JointDiTBlock(hidden, cfg.num_heads, cfg.mlp_ratio, cfg.gelu_approximate, last=i == cfg.depth - 1)
            if cfg.joint_text
            else DiTBlock(hidden, cfg.num_heads, cfg.context_dim, cfg.mlp_ratio, cfg.gelu_approximate)
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(hidden, p, cfg.out_channels)
        self.initialize_weights()

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DiT:
        """Build a named size from :data:`DIT_SIZES`, e.g. ``DiT.from_name("DiT-S/2", context_dim=512)``."""
        if name not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {name!r}; known: {', '.join(DIT_SIZES)}")
        return cls(DiTConfig(**{**DIT_SIZES[name], **overrides}))

    def initialize_weights(self) -> None:
        """Xavier-uniform linears and patch embedding; zero adaLN, cross-attention output, final layer and the
        self-conditioning embedding."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed += [block.adaLN_modulation[-1]]
            zeroed += [block.text_adaLN_modulation[-1]] if self.config.joint_text else [block.cross_attn.to_out]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.self_cond_embedder is not None:  # at init, the plain DiT
            nn.init.zeros_(self.self_cond_embedder.weight)

    def position_embedding(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(height * width, hidden) positions for a patch grid: the cached buffer or computed afresh."""
        if self.pos_embed.shape[0] == height * width and height == width:
            return self.pos_embed
        pos = sincos_pos_embed_2d(self.config.hidden_size, height, width, device=device)
        return pos.to(self.pos_embed.dtype)

    def unpatchify(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h * w, p * p * C) tokens to (B, C, h * p, w * p) images."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], height, width, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, height * p, width * p)

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
        self-conditioned DiT (None: zeros; ignored otherwise). Returns (B, out_channels, H, W)."""
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"DiT input size {tuple(x.shape[-2:])} is not divisible by patch size {p}")
        height, width = x.shape[-2] // p, x.shape[-1] // p
        h = self.x_embedder(x)
        if self.self_cond_embedder is not None and x_self_cond is not None:
            h = h + self.self_cond_embedder(x_self_cond.to(x.dtype))
        h = h.flatten(2).transpose(1, 2) + self.position_embedding(height, width, x.device)
        c = self.t_embedder(expand_timesteps(t, x.shape[0], x.device))
        if self.pooled_embedder is not None:
            if pooled is None:
                raise ValueError("this DiT has pooled_dim set: pass the pooled text embedding")
            c = c + self.pooled_embedder(pooled.to(c.dtype))
        checkpoint = self.gradient_checkpointing and self.training
        if self.context_embedder is not None:
            text = self.context_embedder(context)
            for block in self.blocks:
                h, text = run_block(block, checkpoint, h, c, text, context_mask)
        else:
            for block in self.blocks:
                h = run_block(block, checkpoint, h, c, context, context_mask)
        return self.unpatchify(self.final_layer(h, c), height, width)
