"""The text-conditioned U-Net: shapes, conditioning, masking, batching, storage, gradients."""

from __future__ import annotations

import pytest
import torch

from cyclediffusion.models.unet import UNet, UNetConfig

from helpers import CONTEXT_DIM, inputs, tiny_unet


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape_and_dtype(batch: int) -> None:
    model = tiny_unet()
    x, t, context, _ = inputs(batch)
    out = model(x, t, context)
    assert out.shape == x.shape and out.dtype == torch.float32


def test_other_resolution_and_scalar_time() -> None:
    model = tiny_unet()
    x, _, context, _ = inputs(2, size=(12, 6))
    out = model(x, 500.0, context)
    assert out.shape == (2, 4, 12, 6)
    assert torch.allclose(out, model(x, torch.tensor([500.0, 500.0]), context))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 7, 8), 1.0, context[:1])


def test_out_channels_and_zero_init() -> None:
    torch.manual_seed(0)
    model = UNet(
        UNetConfig(
            block_channels=(16, 32),
            attention_levels=(True, True),
            head_dim=8,
            norm_groups=8,
            context_dim=CONTEXT_DIM,
            out_channels=6,
        )
    )
    x, t, context, _ = inputs(2)
    out = model(x, t, context)
    assert out.shape == (2, 6, 8, 8) and torch.equal(out, torch.zeros_like(out))


def test_bad_attention_levels() -> None:
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(block_channels=(16, 32), attention_levels=(True,))


def test_bfloat16() -> None:
    model = tiny_unet()
    x, t, context, _ = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context)
    assert out.shape == x.shape and torch.isfinite(out).all()
    model = model.to(torch.bfloat16)
    out = model(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
