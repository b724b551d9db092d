"""The text-conditioned U-Net: shapes, conditioning, masking, batching, storage, gradients."""

from __future__ import annotations

import pytest
import torch

from cyclediffusion.models.unet import UNet, UNetConfig

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


def inputs(batch: int, size: tuple[int, int] = (8, 8), seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, TOKENS, CONTEXT_DIM, generator=g)
    pooled = torch.randn(batch, POOLED_DIM, generator=g)
    return x, t, context, pooled


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


def test_depends_on_context_time_and_pooled() -> None:
    model = tiny_unet(pooled_dim=POOLED_DIM)
    x, t, context, pooled = inputs(2)
    with torch.no_grad():
        out = model(x, t, context, pooled)
        assert not torch.allclose(out, model(x, t, torch.randn_like(context), pooled))
        assert not torch.allclose(out, model(x, t + 100, context, pooled))
        assert not torch.allclose(out, model(x, t, context, torch.randn_like(pooled)))
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, context)


def test_batch_independence() -> None:
    model = tiny_unet(pooled_dim=POOLED_DIM)
    x, t, context, pooled = inputs(3)
    with torch.no_grad():
        full = model(x, t, context, pooled)
        for i in range(3):
            one = model(x[i : i + 1], t[i : i + 1], context[i : i + 1], pooled[i : i + 1])
            assert torch.allclose(full[i : i + 1], one, atol=1e-5)


def test_context_mask() -> None:
    model = tiny_unet()
    x, t, context, _ = inputs(2)
    mask = torch.ones(2, TOKENS, dtype=torch.bool)
    mask[:, 3] = False
    changed = context.clone()
    changed[:, 3] = torch.randn(2, CONTEXT_DIM) * 10
    with torch.no_grad():
        out = model(x, t, context, context_mask=mask)
        assert torch.allclose(out, model(x, t, changed, context_mask=mask), atol=1e-6)
        assert not torch.allclose(out, model(x, t, changed))


def test_save_and_load(tmp_path) -> None:
    model = tiny_unet(pooled_dim=POOLED_DIM)
    model.save_pretrained(tmp_path / "unet")
    loaded = UNet.from_pretrained(tmp_path / "unet")
    assert loaded.config == model.config
    x, t, context, pooled = inputs(2)
    with torch.no_grad():
        assert torch.equal(model(x, t, context, pooled), loaded(x, t, context, pooled))


def test_every_parameter_gets_gradient() -> None:
    model = tiny_unet(pooled_dim=POOLED_DIM).train()
    x, t, context, pooled = inputs(2)
    model(x, t, context, pooled).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
