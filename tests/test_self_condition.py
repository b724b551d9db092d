"""Self-conditioning (``--self-condition``): the denoiser also reads its own previous x0 estimate. The models take it
through a zero-initialised input layer, training feeds the estimate of a no-gradient pass on a share of the steps,
samplers carry each row's estimate from one step to the next, and calls that keep none (the edit core) read zeros."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cyclediffusion import CycleDiffusionPipeline, Text2ImagePipeline, create_noise_process
from cyclediffusion.models import DiT
from cyclediffusion.training import ModelOptions
from cyclediffusion.training.modules import DiffusionModule, OptimConfig

from helpers import denoiser, inputs, randomise_zeros, tiny_dit, tiny_pipeline, tiny_text_encoder, tiny_tokenizer

BACKBONES = ["unet", "dit"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_estimate_enters_through_a_zeroed_layer_and_zeros_are_no_estimate(backbone: str) -> None:
    fresh = DiT(replace(tiny_dit().config, self_condition=True)) if backbone == "dit" else None
    if fresh is not None:  # a fresh model is the plain one: the estimate's layer starts at zero, the rest does not
        assert not fresh.self_cond_embedder.weight.any() and fresh.x_embedder.weight.any()
    model = denoiser(backbone, self_condition=True)  # zero-initialised layers randomised
    plain = denoiser(backbone)
    assert model.self_conditioned and not plain.self_conditioned
    x, t, context, _ = inputs(3)
    estimate = torch.randn_like(x)
    with torch.no_grad():
        none = model(x, t, context)
        assert torch.equal(none, model(x, t, context, x_self_cond=torch.zeros_like(x)))
        read = model(x, t, context, x_self_cond=estimate)
        assert (read - none).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every row reads its estimate
        one = model(x[1:2], t[1:2], context[1:2], x_self_cond=estimate[1:2])
        torch.testing.assert_close(one, read[1:2], atol=1e-5, rtol=0)  # and only its own
    layer = model.self_cond_embedder if backbone == "dit" else model.self_cond_in
    model.train()(x, t, context, x_self_cond=estimate).square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.any()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_saved_and_loaded_it_reads_the_estimate_the_same_way(backbone: str, tmp_path) -> None:
    model = denoiser(backbone, self_condition=True)
    model.save_pretrained(tmp_path / backbone)
    loaded = type(model).from_pretrained(tmp_path / backbone)
    assert loaded.config.self_condition and loaded.self_conditioned
    x, t, context, _ = inputs(2)
    with torch.no_grad():
        assert torch.equal(model(x, t, context, x_self_cond=x), loaded(x, t, context, x_self_cond=x))


@pytest.mark.parametrize("process", ["flow", "ddpm"])
def test_path_time_inverts_model_time(process: str) -> None:
    noise = create_noise_process(process)
    t = torch.tensor([0.0, 0.25, 0.9]) if process == "flow" else torch.tensor([0, 17, 999])
    assert torch.equal(noise.path_time(noise.model_time(t)), t)


def training_parts(process: str = "flow", self_condition: bool = True) -> tuple:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(max_length=20)
    config = dict(in_channels=3, out_channels=3, sample_size=16, context_dim=32, pooled_dim=32)
    model = tiny_dit(**config, self_condition=self_condition)
    return tokenizer, tiny_text_encoder(tokenizer), model, create_noise_process(process), None, OptimConfig()


def spy(model: torch.nn.Module) -> list[dict]:
    """Record every forward call of ``model``: its inputs, ``x_self_cond`` and output."""
    calls: list[dict] = []
    forward = model.forward

    def recording(x, t, context, pooled=None, context_mask=None, **kwargs):
        out = forward(x, t, context, pooled, context_mask, **kwargs)
        calls.append({"x": x, "t": t, "estimate": kwargs.get("x_self_cond"), "out": out, "grad": out.requires_grad})
        return out

    model.forward = recording
    return calls


@pytest.mark.parametrize("process", ["flow", "ddpm"])
def test_training_feeds_the_models_own_no_gradient_estimate(process: str) -> None:
    parts = training_parts(process)
    batch = {"pixels": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1}
    batch |= {"caption": ["a red square"] * 4, "step": torch.zeros(4)}
    module = DiffusionModule(*parts, self_condition=1.0)
    calls = spy(module.denoiser)
    module.step_losses(batch)
    first, second = calls
    assert first["estimate"] is None and not first["grad"] and second["grad"]
    noise = module.noise_process
    expected = noise.to_x0_eps(first["out"].float(), first["x"], noise.path_time(first["t"]))[0]
    torch.testing.assert_close(second["estimate"], expected)
    assert torch.equal(second["x"], first["x"])

    # a share p of the steps, decided by the step alone (a resumed run decides the same)
    def estimated_steps(p: float) -> list[int]:
        module = DiffusionModule(*training_parts(process), self_condition=p)
        calls = spy(module.denoiser)
        steps = []
        for step in range(24):
            calls.clear()
            module.step_losses(batch | {"step": torch.full((4,), step)})
            steps += [step] if len(calls) == 2 else []
        return steps

    half = estimated_steps(0.5)
    assert 4 <= len(half) <= 20 and half == estimated_steps(0.5)
    assert estimated_steps(0.0) == []


def test_self_conditioning_needs_a_self_conditioned_denoiser_and_a_probability() -> None:
    with pytest.raises(ValueError, match="self_condition=True"):
        DiffusionModule(*training_parts(self_condition=False), self_condition=0.5)
    with pytest.raises(ValueError, match="probability"):
        DiffusionModule(*training_parts(), self_condition=1.5)
    with pytest.raises(ValueError, match="--self-condition"):
        ModelOptions(self_condition=-0.1)
    tokenizer = tiny_tokenizer()
    for backbone in BACKBONES:
        options = ModelOptions(backbone=backbone, model_size="tiny", text_width=32, self_condition=0.5)
        assert options.build(tokenizer, None, 16)["denoiser"].self_conditioned
        assert not replace(options, self_condition=0.0).build(tokenizer, None, 16)["denoiser"].self_conditioned


def self_conditioned(pipe: Text2ImagePipeline, cls: type = Text2ImagePipeline) -> Text2ImagePipeline:
    torch.manual_seed(0)
    model = DiT(replace(pipe.denoiser.config, self_condition=True))
    randomise_zeros(model)
    return cls(**{**pipe.components, "denoiser": model}).eval()


@pytest.mark.parametrize("process", ["flow", "ddpm"])
def test_each_sampler_step_reads_each_rows_previous_estimate(process: str) -> None:
    pipe = self_conditioned(tiny_pipeline("dit", process))
    calls = spy(pipe.denoiser)
    prompts = ["a red square", "a blue circle"]
    pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4 and calls[0]["estimate"] is None
    noise = pipe.noise_process
    for before, now in zip(calls, calls[1:]):  # rows: unconditional and conditional of each prompt, each its own
        expected = noise.to_x0_eps(before["out"].float(), before["x"], noise.path_time(before["t"]))[0]
        assert now["estimate"].shape[0] == 4
        torch.testing.assert_close(now["estimate"], expected)
    # the next run starts afresh
    calls.clear()
    pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert calls[0]["estimate"] is None


def test_edits_of_a_self_conditioned_model_read_zeros_and_still_give_back_the_input() -> None:
    pipe = self_conditioned(tiny_pipeline("dit", "flow"), CycleDiffusionPipeline)
    calls = spy(pipe.denoiser)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    x0 = pipe.image_latents(image, 2, 1, torch.Generator().manual_seed(3))
    prompts = ["a red square", "a blue circle"]
    out = pipe(prompts, prompts, image, num_inference_steps=8, guidance_scale=2.0, source_guidance_scale=2.0,
               eta=0.1, output_type="latent", generator=torch.Generator().manual_seed(3)).images  # fmt: skip
    assert calls and all(c["estimate"] is None for c in calls)
    assert (out - x0).abs().max() <= 1e-4
