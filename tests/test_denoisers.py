"""The denoiser interface shared by the U-Net and the DiT: conditioning, batching, masking, storage, gradients."""

from __future__ import annotations

import pytest
import torch

from helpers import CONTEXT_DIM, POOLED_DIM, TOKENS, denoiser, inputs

BACKBONES = ["unet", "dit", "dit_joint"]  # dit_joint: MM-DiT blocks (DiTConfig.joint_text)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_depends_on_context_time_and_pooled(backbone: str) -> None:
    model = denoiser(backbone, pooled_dim=POOLED_DIM)
    x, t, context, pooled = inputs(2)
    with torch.no_grad():
        out = model(x, t, context, pooled)
        assert not torch.allclose(out, model(x, t, torch.randn_like(context), pooled))
        assert not torch.allclose(out, model(x, t + 100, context, pooled))
        assert not torch.allclose(out, model(x, t, context, torch.randn_like(pooled)))
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, context)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_batch_independence(backbone: str) -> None:
    model = denoiser(backbone, pooled_dim=POOLED_DIM)
    x, t, context, pooled = inputs(3)
    with torch.no_grad():
        full = model(x, t, context, pooled)
        for i in range(3):
            one = model(x[i : i + 1], t[i : i + 1], context[i : i + 1], pooled[i : i + 1])
            assert torch.allclose(full[i : i + 1], one, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_context_mask(backbone: str) -> None:
    model = denoiser(backbone)
    x, t, context, _ = inputs(2)
    mask = torch.ones(2, TOKENS, dtype=torch.bool)
    mask[:, 3] = False
    changed = context.clone()
    changed[:, 3] = torch.randn(2, CONTEXT_DIM) * 10
    with torch.no_grad():
        out = model(x, t, context, context_mask=mask)
        assert torch.allclose(out, model(x, t, changed, context_mask=mask), atol=1e-6)
        assert not torch.allclose(out, model(x, t, changed))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_and_load(backbone: str, tmp_path) -> None:
    model = denoiser(backbone, pooled_dim=POOLED_DIM)
    model.save_pretrained(tmp_path / backbone)
    loaded = type(model).from_pretrained(tmp_path / backbone)
    assert loaded.config == model.config
    x, t, context, pooled = inputs(2)
    with torch.no_grad():
        assert torch.equal(model(x, t, context, pooled), loaded(x, t, context, pooled))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_parameter_gets_gradient(backbone: str) -> None:
    model = denoiser(backbone, pooled_dim=POOLED_DIM).train()
    x, t, context, pooled = inputs(2)
    model(x, t, context, pooled).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradient_checkpointing_keeps_outputs_and_gradients(backbone: str) -> None:
    """``--gradient-checkpointing`` recomputes every block in the backward pass: the same loss and gradients, and
    each block runs twice per training step (once more in backward); off in eval mode."""
    from cyclediffusion.training.train import enable_gradient_checkpointing

    model = denoiser(backbone, pooled_dim=POOLED_DIM).train()
    x, t, context, pooled = inputs(2)
    context.requires_grad_(True)

    def step() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        calls = [0]
        blocks = [m for m in model.modules() if type(m).__name__ in ("UNetBlock", "DiTBlock", "JointDiTBlock")]
        handles = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in blocks]
        model.zero_grad()
        context.grad = None
        out = model(x, t, context, pooled)
        out.square().mean().backward()
        for h in handles:
            h.remove()
        return out.detach(), [p.grad.clone() for p in model.parameters()] + [context.grad.clone()], calls[0]

    plain_out, plain_grads, plain_calls = step()
    enable_gradient_checkpointing(model)
    assert model.gradient_checkpointing
    out, grads, calls = step()
    assert torch.allclose(out, plain_out, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain_grads))
    assert calls == 2 * plain_calls
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model(x, t, context, pooled), plain_out, atol=1e-6)


def test_gradient_checkpointing_reaches_a_diffusers_unet() -> None:
    diffusers = pytest.importorskip("diffusers")
    from cyclediffusion.training.train import enable_gradient_checkpointing

    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    wrapper = torch.nn.Sequential(unet)  # as the Stable Diffusion adapter holds it
    enable_gradient_checkpointing(wrapper)
    assert unet.is_gradient_checkpointing
    with pytest.raises(ValueError, match="no blocks to checkpoint"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
