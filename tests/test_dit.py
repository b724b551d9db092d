"""The text-conditioned DiT: adaLN-Zero init, shapes, conditioning, masking, storage, named sizes."""

from __future__ import annotations

import pytest
import torch

from cyclediffusion.models.dit import DIT_SIZES, DiT, sincos_pos_embed_2d

from helpers import CONTEXT_DIM, POOLED_DIM, inputs, tiny_dit


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape_and_dtype(batch: int) -> None:
    model = tiny_dit()
    x, t, context, _ = inputs(batch)
    out = model(x, t, context)
    assert out.shape == x.shape and out.dtype == torch.float32


def test_other_resolution_and_scalar_time() -> None:
    model = tiny_dit(patch_size=4, out_channels=3)
    x, _, context, _ = inputs(2, size=(16, 12))
    out = model(x, 250.0, context)
    assert out.shape == (2, 3, 16, 12)
    assert torch.allclose(out, model(x, torch.tensor([250.0, 250.0]), context))
    with pytest.raises(ValueError, match="patch size"):
        model(torch.randn(1, 4, 10, 8), 1.0, context[:1])


def test_position_embedding() -> None:
    model = tiny_dit()
    assert "pos_embed" not in model.state_dict()
    assert torch.equal(model.position_embedding(4, 4, torch.device("cpu")), sincos_pos_embed_2d(32, 4, 4))
    pos = sincos_pos_embed_2d(32, 3, 5)
    assert pos.shape == (15, 32) and torch.unique(pos, dim=0).shape[0] == 15


def test_unpatchify_inverts_patch_layout() -> None:
    model = tiny_dit(in_channels=3, out_channels=3)
    images = torch.randn(2, 3, 8, 12)
    p = model.config.patch_size
    tokens = images.reshape(2, 3, 4, p, 6, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 24, p * p * 3)
    assert torch.equal(model.unpatchify(tokens, 4, 6), images)


@pytest.mark.parametrize("joint_text", [False, True])
def test_zero_at_init_then_learns(joint_text: bool) -> None:
    model = tiny_dit(randomise=False, pooled_dim=POOLED_DIM, joint_text=joint_text).train()
    x, t, context, pooled = inputs(2)
    out = model(x, t, context, pooled)
    assert torch.equal(out, torch.zeros_like(out))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (out - x).square().mean().backward()
    optimizer.step()
    assert model(x, t, context, pooled).abs().sum() > 0


@pytest.mark.parametrize("joint_text", [False, True])
def test_bfloat16(joint_text: bool) -> None:
    model = tiny_dit(joint_text=joint_text)
    x, t, context, _ = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context)
    assert out.shape == x.shape and torch.isfinite(out).all()
    model = model.to(torch.bfloat16)
    out = model(torch.randn(1, 4, 12, 8, dtype=torch.bfloat16), t[:1], context[:1].bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_named_sizes() -> None:
    assert {"DiT-S/2", "DiT-S/4", "DiT-B/2", "DiT-B/4", "DiT-L/2", "DiT-L/4"} <= set(DIT_SIZES)
    model = DiT.from_name("DiT-S/2", sample_size=16, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (384, 12, 6, 2)
    assert (cfg.sample_size, cfg.context_dim, cfg.pooled_dim) == (16, CONTEXT_DIM, POOLED_DIM)
    assert len(model.blocks) == 12 and model.pos_embed.shape == (64, 384)
    assert DIT_SIZES["DiT-L/4"] == dict(hidden_size=1024, depth=24, num_heads=16, patch_size=4)
    with pytest.raises(ValueError, match="DiT-S/2"):
        DiT.from_name("DiT-M/2")


def test_mini_patch2_size_tokens_and_shapes() -> None:
    """``mini/2``: 2x2 patches give 16 tokens on 8x8 latents, and the output keeps the latent's shape."""
    from cyclediffusion.recipes import build_denoiser

    model = build_denoiser("dit", "mini/2", in_channels=4, sample_size=8, context_dim=CONTEXT_DIM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (192, 4, 4, 2)
    assert model.pos_embed.shape == (16, 192)
    x, t, context, _ = inputs(2)
    pooled = context.mean(dim=1)  # recipes join the pooled text at the context's width
    with torch.no_grad():
        for block in model.blocks:  # adaLN-Zero: open the gates so the blocks act
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
        out = model(x, t, context, pooled)
        shifted = model(x.roll(2, dims=-1), t, context, pooled)  # one patch to the right (cyclically)
    assert out.shape == x.shape
    assert not torch.allclose(out, shifted.roll(-2, dims=-1), atol=1e-4)  # tokens know their absolute place


def test_gelu_form_is_stored_and_old_models_keep_theirs(tmp_path) -> None:
    from cyclediffusion.config import read_json, write_json
    from cyclediffusion.recipes import build_denoiser

    built = build_denoiser("dit", "tiny", in_channels=4, sample_size=8, context_dim=CONTEXT_DIM)
    assert built.config.gelu_approximate == "none" and built.blocks[0].mlp.approximate == "none"
    model = tiny_dit()
    assert model.config.gelu_approximate == "tanh"  # the paper's form stays the class default
    x, t, context, _ = inputs(2)
    out = model(x, t, context)
    model.save_pretrained(tmp_path / "old")
    config = read_json(tmp_path / "old" / "config.json")
    assert config.pop("gelu_approximate") == "tanh"
    write_json(tmp_path / "old" / "config.json", config)  # as a model saved before the field existed
    loaded = DiT.from_pretrained(tmp_path / "old")
    assert loaded.config.gelu_approximate == "tanh" and torch.equal(loaded(x, t, context), out)
    exact = DiT.from_config(model.config, gelu_approximate="none")
    exact.load_state_dict(model.state_dict())
    assert 0 < (exact(x, t, context) - out).abs().max() < 1e-2  # a different function, only just
    with pytest.raises(ValueError, match="GELU"):
        DiT.from_config(model.config, gelu_approximate="fast")
