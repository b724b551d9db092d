"""Tiny components and data for tests: everything is built from configs, nothing is downloaded."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from cyclediffusion import (
    AutoencoderKL,
    DiT,
    DiTConfig,
    Text2ImagePipeline,
    TextEncoder,
    TextEncoderConfig,
    Tokenizer,
    UNet,
    UNetConfig,
    VAEConfig,
    create_noise_process,
)

CAPTIONS = [
    "a red square",
    "a blue circle",
    "a small green triangle on the left",
    "two yellow circles",
    "a purple square above a blue circle",
]

# Colours of the two-caption overfitting world.
RED = (1.0, -1.0, -1.0)
BLUE = (-1.0, -1.0, 1.0)


def tiny_tokenizer(max_length: int = 12) -> Tokenizer:
    return Tokenizer.train(CAPTIONS * 3, vocab_size=300, max_length=max_length)


def tiny_text_encoder(tokenizer: Tokenizer, width: int = 32) -> TextEncoder:
    return TextEncoder(
        TextEncoderConfig(
            vocab_size=tokenizer.vocab_size,
            max_length=tokenizer.max_length,
            width=width,
            layers=2,
            heads=2,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_denoiser(backbone: str, channels: int, size: int, context_dim: int = 32) -> UNet | DiT:
    if backbone == "unet":
        return UNet(
            UNetConfig(
                in_channels=channels,
                out_channels=channels,
                sample_size=size,
                block_channels=(32, 64),
                layers_per_block=1,
                attention_levels=(False, True),
                head_dim=16,
                context_dim=context_dim,
                pooled_dim=context_dim,
                norm_groups=8,
            )
        )
    return DiT(
        DiTConfig(
            sample_size=size,
            patch_size=2,
            in_channels=channels,
            out_channels=channels,
            hidden_size=64,
            depth=3,
            num_heads=4,
            context_dim=context_dim,
            pooled_dim=context_dim,
        )
    )


def tiny_vae(downsample: int = 4) -> AutoencoderKL:
    levels = {2: (16, 32), 4: (16, 32, 32), 8: (16, 32, 32, 32)}[downsample]
    return AutoencoderKL(VAEConfig(block_channels=levels, layers_per_block=1, norm_groups=8))


def tiny_pipeline(
    backbone: str = "unet", process: str = "ddpm", vae: bool = False, size: int = 16, **process_options
) -> Text2ImagePipeline:
    tokenizer = tiny_tokenizer()
    autoencoder = tiny_vae() if vae else None
    channels, latent_size = (4, size // autoencoder.downsample_factor) if autoencoder else (3, size)
    return Text2ImagePipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(tokenizer),
        vae=autoencoder,
        denoiser=tiny_denoiser(backbone, channels, latent_size),
        noise_process=create_noise_process(process, **process_options),
    ).eval()


def randomise_zeros(module: torch.nn.Module) -> None:
    """Zero-initialised output layers predict exactly 0 (and block every gradient but their own): give them
    something to say."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(std=0.05)


def squares(n: int = 8, size: int = 16) -> torch.Tensor:
    """Fixed images in [-1, 1]: a coloured square on a grey background."""
    g = torch.Generator().manual_seed(1)
    images = torch.full((n, 3, size, size), -0.5)
    for i in range(n):
        colour = torch.rand(3, generator=g) * 2 - 1
        side = int(torch.randint(4, 9, (1,), generator=g))
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
        images[i, :, y : y + side, x : x + side] = colour[:, None, None]
    return images


def two_caption_world(size: int = 16) -> tuple[torch.Tensor, list[str]]:
    """8 images in [-1, 1]: 4 red squares and 4 blue discs at different places, with their captions."""
    images, captions = [], []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    offsets = [(4, 4), (4, 11), (11, 4), (11, 11)]
    for colour, caption, shape in ((RED, "a red square", "square"), (BLUE, "a blue circle", "circle")):
        for cy, cx in offsets:
            if shape == "square":
                mask = ((yy - cy).abs() <= 3) & ((xx - cx).abs() <= 3)
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 12
            image = torch.full((3, size, size), -0.2)
            for c in range(3):
                image[c][mask] = colour[c]
            images.append(image)
            captions.append(caption)
    return torch.stack(images), captions


def train(
    pipe, images, captions, steps: int, lr: float, seed: int = 0, batch_size: int | None = None
) -> tuple[float, float]:
    """Train in place (full batch, or random batches of ``batch_size``); return the loss on a fixed evaluation
    batch before and after."""
    torch.manual_seed(seed)
    process, denoiser, encoder = pipe.noise_process, pipe.denoiser, pipe.text_encoder
    ids = pipe.tokenizer(captions).input_ids
    empty = pipe.tokenizer([""]).input_ids

    def loss_on(x0, ids, noise=None, t=None, generator=None):
        text = encoder(ids)

        def model_fn(x, s):
            return denoiser(x, s, text.hidden_states, text.pooled, text.mask)

        return process.training_loss(model_fn, x0, noise=noise, t=t, generator=generator).loss.mean()

    g = torch.Generator().manual_seed(123)
    eval_noise = torch.randn(images.shape, generator=g)
    eval_t = (
        torch.linspace(50, 950, len(images)).long()
        if hasattr(process, "alphas_cumprod")
        else torch.linspace(0.05, 0.95, len(images))
    )

    def evaluate() -> float:
        with torch.no_grad():
            return float(loss_on(images, ids, eval_noise, eval_t))

    before = evaluate()
    params = list(denoiser.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    denoiser.train(), encoder.train()
    for _ in range(steps):
        rows = torch.randperm(len(images))[:batch_size] if batch_size else torch.arange(len(images))
        drop = torch.rand(len(rows)) < 0.1
        batch_ids = torch.where(drop[:, None], empty.expand(len(rows), -1), ids[rows])
        loss = loss_on(images[rows], batch_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    denoiser.eval(), encoder.eval()
    return before, evaluate()


# ---------------------------------------------------------------- the denoiser interface (U-Net and DiT)
CONTEXT_DIM, POOLED_DIM, TOKENS = 16, 12, 5


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    """A two-level U-Net with attention on the lower level and the zero-initialised layers randomised."""
    torch.manual_seed(seed)
    config = dict(
        in_channels=4,
        out_channels=4,
        sample_size=8,
        block_channels=(16, 32),
        layers_per_block=1,
        attention_levels=(False, True),
        head_dim=8,
        norm_groups=8,
        context_dim=CONTEXT_DIM,
    )
    model = UNet(UNetConfig(**{**config, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model.eval()


def tiny_dit(seed: int = 0, randomise: bool = True, **overrides) -> DiT:
    """A two-block DiT; with ``randomise`` its zero-initialised layers get random values."""
    torch.manual_seed(seed)
    config = dict(sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=CONTEXT_DIM)
    model = DiT(DiTConfig(**{**config, **overrides}))
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(std=0.1)
    return model.eval()


def inputs(batch: int, size: tuple[int, int] = (8, 8), seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, TOKENS, CONTEXT_DIM, generator=g)
    pooled = torch.randn(batch, POOLED_DIM, generator=g)
    return x, t, context, pooled


def denoiser(backbone: str, **overrides) -> UNet | DiT:
    """``tiny_unet`` or ``tiny_dit`` (zero-initialised layers randomised); ``"dit_joint"``: the DiT with MM-DiT
    blocks."""
    if backbone == "dit_joint":
        return tiny_dit(joint_text=True, **overrides)
    return tiny_unet(**overrides) if backbone == "unet" else tiny_dit(**overrides)


# ---------------------------------------------------------------- benchmark scripts
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """Import ``benchmarks/<name>.py`` as a module (its sibling imports work)."""
    if str(BENCHMARKS) not in sys.path:  # the scripts import their shared helpers (common.py) as a sibling
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
