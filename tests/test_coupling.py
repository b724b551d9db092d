"""Attention coupling (prompt-to-prompt): the target rows take the source rows' attention weights for shared words
(cross) or outright (self), through attention processors; edits stay exact when nothing changes; clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_edit import cycle_pipeline, pictures, saved_model  # noqa: F401

from cyclediffusion.models.layers import Attention, attention_weights
from cyclediffusion.pipelines.coupling import AttentionCoupling, CouplingProcessor, coupled, token_map

from helpers import tiny_dit


def test_token_map_aligns_the_shared_words():
    assert token_map([1, 5, 7, 9, 2], [1, 5, 8, 9, 2]).tolist() == [0, 1, -1, 3, 4]
    assert token_map([1, 5, 9, 2], [1, 5, 6, 9, 2]).tolist() == [0, 1, -1, 2, 3]  # a word added
    assert token_map([1, 2], [1, 2]).tolist() == [0, 1]


def test_processor_gives_the_target_rows_the_source_weights():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    weights = attention_weights(q, k)
    torch.testing.assert_close(weights @ v, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    processor = CouplingProcessor(torch.tensor([[0, -1, 2, 3]]))
    processor.source_rows, processor.target_rows = torch.tensor([0]), torch.tensor([1])
    cross, self_attn = Attention(8, 2, context_dim=8), Attention(8, 2)
    processor.cross = True
    out = processor(cross, q, k, v, None, False)
    expected = weights[1].clone()
    expected[..., [0, 2, 3]] = weights[0][..., [0, 2, 3]]  # shared tokens from the source, the changed one its own
    torch.testing.assert_close(out[1], expected @ v[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], weights[0] @ v[0], atol=1e-5, rtol=1e-5)  # the source row is left alone
    torch.testing.assert_close(processor(self_attn, q, k, v, None, False), F.scaled_dot_product_attention(q, k, v))
    processor.self_ = True
    torch.testing.assert_close(processor(self_attn, q, k, v, None, False)[1], weights[0] @ v[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["cycle", "ef_ddpm", "ddim_inversion", "flowedit"])
def test_coupled_edits_give_back_the_input_and_change_the_edit(one_thread, method):
    pipe = cycle_pipeline("unet", "flow" if method == "flowedit" else "ddpm", vae=True)
    image = pictures(2)
    x0 = pipe.image_latents(image, 2, 1, torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=8, guidance_scale=2.0, source_guidance_scale=2.0, output_type="latent",
                  eta=1.0, method=method, coupling=AttentionCoupling(cross_steps=1.0, self_steps=0.5))  # fmt: skip
    prompts = ["a red square", "a blue circle"]
    same = pipe(prompts, prompts, image, generator=torch.Generator().manual_seed(3), **kwargs).images
    if method != "ddim_inversion":  # inversion is exact only up to its approximation
        assert (same - x0).abs().max() <= 1e-4
    targets = ["a blue square", "a red circle"]
    coupled_edit = pipe(targets, prompts, image, generator=torch.Generator().manual_seed(3), **kwargs).images
    plain = pipe(targets, prompts, image, generator=torch.Generator().manual_seed(3), **{**kwargs, "coupling": None})
    assert (coupled_edit - plain.images).abs().max() > 1e-4  # coupling changes what the target draws
    assert all(layer.processor is None for layer in pipe.denoiser.modules() if isinstance(layer, Attention))


def test_coupling_counts_the_source_chain_of_ddim_inversion(one_thread):
    pipe = cycle_pipeline("unet", "ddpm", vae=True)
    out = pipe("a blue circle", "a red square", pictures(1), num_inference_steps=4, strength=1.0, guidance_scale=3.0,
               method="ddim_inversion", coupling=AttentionCoupling(), output_type="latent")  # fmt: skip
    assert out.nfe == 4 * (1 + 1 + 2)  # inversion, then source and guided target side by side


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "sdedit", "coupling": AttentionCoupling()}, "no source branch to couple"),
        ({"coupling": "yes"}, "AttentionCoupling"),
    ],
)
def test_coupling_errors(kwargs, message):
    pipe = cycle_pipeline()
    with pytest.raises((ValueError, TypeError), match=message):
        pipe("a red square", "a blue circle", pictures(1), num_inference_steps=2, **kwargs)
    with pytest.raises(ValueError, match="cross_steps"):
        AttentionCoupling(cross_steps=1.5)
    with pytest.raises(ValueError, match="one model for both branches"):
        from cyclediffusion import translate

        translate(pictures(1), pipe, cycle_pipeline(seed=1), coupling=AttentionCoupling(), num_inference_steps=2)
    with pytest.raises(ValueError, match="has none"), coupled(torch.nn.Linear(2, 2), CouplingProcessor(None)):
        pass
    with pytest.raises(ValueError, match="MM-DiT"), coupled(tiny_dit(joint_text=True), CouplingProcessor(None)):
        pass


def test_cli_edit_with_coupling(saved_model, capsys):  # noqa: F811
    from cyclediffusion.cli import main

    args = ["edit", "--model", str(saved_model / "run"), "--image", str(saved_model / "in.png")]
    args += ["--source-prompt", "a red square", "--prompt", "a blue square", "--steps", "4"]
    assert main([*args, "--couple-cross", "0.8", "--couple-self", "0.3", "--out", str(saved_model / "c.png")]) == 0
    assert (saved_model / "c.png").is_file()
    capsys.readouterr()
    assert main([*args, "--couple-cross", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cross_steps" in err[0]
