"""Building blocks shared by the networks: time embedding, attention, feed-forward, ResBlocks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) times in the model's time units (0..1000), as (B, dim).

    Flow-matching times in [0, 1] must be scaled to [0, 1000] by the noise process before they
    reach here: fed raw, they would use only the slowest frequencies of a 10000-period embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_pos_embed_2d(dim: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed (height * width, dim) sin-cos position embedding, row-major; half the features for each axis."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float64),
        torch.arange(width, device=device, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for pos in (ys, xs):
        args = pos.reshape(-1, 1) * omega
        parts += [args.sin(), args.cos()]
    return torch.cat(parts, dim=1).float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the time followed by a two-layer MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with ``min(groups, channels)`` groups (tiny test models have few channels)."""
    groups = math.gcd(min(groups, channels), channels)
    return nn.GroupNorm(groups, channels, eps=eps)


class Attention(nn.Module):
    """Multi-head attention over token sequences through ``F.scaled_dot_product_attention``.

    Self-attention when ``context`` is None, cross-attention otherwise (keys and values from
    ``context``, which may have ``context_dim`` features).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.is_cross = context_dim is not None
        self.processor: AttentionProcessor | None = None  # None: scaled_dot_product_attention
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """``x``: (B, N, dim); ``context``: (B, M, context_dim); ``mask``: (B, M) bool, True = attend."""
        b, n, _ = x.shape
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (z.view(b, -1, self.heads, z.shape[-1] // self.heads).transpose(1, 2) for z in (q, k, v))
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        if self.processor is not None:
            out = self.processor(self, q, k, v, attn_mask, causal)
        else:
            out = scaled_dot_product_attention(q, k, v, attn_mask, causal)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


EXPLICIT_ATTENTION_TOKENS = 256
"""CPU training in half precision attends through explicit matmuls and softmax up to this many query or key tokens."""


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; explicit attention when training in bf16 or fp16 on a CPU.

    torch's CPU flash-attention backward is slow in half precision for short sequences: for 64 image tokens and 16
    text tokens at batch 64 it took 22 ms per call in bf16 against 2.6 ms in fp32 (Xeon with AMX, torch 2.13). Its
    fp32 kernel on casts of the inputs was the first cure; two half-precision matmuls around a softmax, with autograd
    through them, do better still (AMD Zen 4 with AVX512_BF16, forward + backward at batch 64: the demo DiT's
    self-attention 5.0 ms against 13.0 ms through the fp32 kernel, a 256-token one 32 against 72 ms;
    ``benchmarks/attention_bf16.py``). Longer sequences, inference and fp32 keep torch's kernel.
    """
    short = max(q.shape[-2], k.shape[-2]) <= EXPLICIT_ATTENTION_TOKENS
    if short and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return attention_weights(q, k, attn_mask, causal, dtype=q.dtype) @ v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)


AttentionProcessor = Callable[[Attention, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool],
                              torch.Tensor]  # fmt: skip
"""``processor(attention, q, k, v, attn_mask, causal) -> out``: (B, heads, N, d) tensors, ``attn_mask`` (B, 1, 1, M)
bool or None. Set on :attr:`Attention.processor` to change how the weights are formed (attention coupling for
editing) without touching the model's maths elsewhere."""


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The softmax weights (B, heads, N, M) that ``scaled_dot_product_attention`` applies to the values, computed in
    ``dtype`` (fp32 unless told); a query whose keys are all masked gets zero weights, as in torch's kernel."""
    scores = (q.to(dtype) * q.shape[-1] ** -0.5) @ k.to(dtype).transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    if causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    if attn_mask is not None:
        weights = weights.masked_fill(~attn_mask.any(dim=-1, keepdim=True), 0.0)
    return weights


class FeedForward(nn.Module):
    """GEGLU feed-forward (as in Stable Diffusion's transformer blocks)."""

    def __init__(self, dim: int, mult: float = 4.0) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.proj_in = nn.Linear(dim, inner * 2)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(h * F.gelu(gate))


class Mlp(nn.Module):
    """Two-layer GELU MLP (transformer blocks of the text encoder and the DiT); ``approximate`` is F.gelu's
    (``"tanh"``, as in GPT-2 and DiT, or ``"none"``, the exact erf form)."""

    def __init__(self, dim: int, mult: float = 4.0, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"unknown GELU approximation {approximate!r}; choose 'tanh' or 'none'")
        inner = int(dim * mult)
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def init_transformer_weights(model: nn.Module, position_embedding: nn.Parameter) -> None:
    """GPT/CLIP-style initialisation: Normal(0, 0.02) linear and embedding weights, zero biases, small random
    learned positions (LayerNorms stay at identity)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(position_embedding, std=0.01)


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: self-attention (causal or not) and an MLP, each with a residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: (B, N) bool, True = a token others may attend to (bidirectional blocks only)."""
        x = x + self.attn(self.norm1(x), mask=mask, causal=self.causal)
        return x + self.mlp(self.norm2(x))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block, with an optional additive time embedding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int | None = None,
        groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels) if emb_dim else None
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None and emb is not None:
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3 convolution halving the resolution."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling followed by a 3x3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (VAE mid block)."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.attn = Attention(channels, heads=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


def expand_timesteps(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Times as a (batch,) tensor on ``device``: a number, 0-d or one-element tensor is broadcast."""
    t = torch.as_tensor(t, device=device)
    if t.numel() == 1:
        t = t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected {batch} times or a scalar, got shape {tuple(t.shape)}")
    return t


def run_block(block: nn.Module, checkpoint: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """``block(*args)``; with ``checkpoint`` (and gradients on) its activations are recomputed in the backward pass
    instead of stored (gradient checkpointing: less memory, one more forward of the block)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)
