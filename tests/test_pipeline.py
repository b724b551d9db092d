"""Text2ImagePipeline: outputs, guidance, batching, pixel and latent space, and save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cyclediffusion import NotAPipelineError, Text2ImagePipeline

from helpers import tiny_pipeline


def randomise(pipe: Text2ImagePipeline, seed: int = 0) -> Text2ImagePipeline:
    """Perturb zero-initialised output layers so that an untrained pipeline has non-trivial outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pipe


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(output_type):
    pipe = tiny_pipeline("unet", vae=True)
    out = pipe(
        ["a red square", "a blue circle"],
        num_inference_steps=2,
        num_images_per_prompt=2,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
    ).images
    if output_type == "pil":
        assert len(out) == 4 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in out)
    elif output_type == "np":
        assert out.shape == (4, 16, 16, 3) and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1
    elif output_type == "pt":
        assert out.shape == (4, 3, 16, 16) and 0 <= out.min() <= out.max() <= 1
    else:
        assert out.shape == (4, 4, 4, 4)


def test_pixel_space_when_vae_is_none():
    pipe = tiny_pipeline("dit", vae=False)
    out = pipe("a red square", num_inference_steps=2, output_type="pt", height=16, width=16).images
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="multiples"):
        tiny_pipeline("unet", vae=True)("a red square", num_inference_steps=1, height=18, width=16)


@pytest.mark.parametrize("backbone,process", [("unet", "ddpm"), ("dit", "flow")])
def test_batch_with_guidance_equals_single_runs(backbone, process):
    pipe = randomise(tiny_pipeline(backbone, process))
    prompts = ["a red square", "a blue circle", "two yellow circles"]
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, output_type="pt")
    batch = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in range(3)], **kwargs).images
    for s, prompt in enumerate(prompts):
        single = pipe(prompt, generator=torch.Generator().manual_seed(s), **kwargs).images
        torch.testing.assert_close(batch[s : s + 1], single, atol=1e-4, rtol=1e-4)  # batched-conv rounding
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_guidance_is_one_batched_forward_and_follows_the_formula():
    pipe = randomise(tiny_pipeline("unet", "ddpm", prediction_type="v_prediction"))
    calls = []
    original = pipe.denoiser.forward

    def spy(x, t, context, pooled=None, context_mask=None):
        calls.append(x.shape[0])
        return original(x, t, context, pooled, context_mask)

    pipe.denoiser.forward = spy
    pipe(["a red square", "a blue circle"], num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    assert calls == [4, 4, 4]  # one forward per step, conditional and unconditional batched together
    calls.clear()
    pipe(["a red square", "a blue circle"], num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    assert calls == [2, 2, 2]  # guidance 1 needs no unconditional branch
    pipe.denoiser.forward = original

    cond = pipe.encode_prompt(["a red square"])
    uncond = pipe.encode_prompt([""])
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500.0])
    guided = pipe.guided_model_fn(cond, uncond, 4.0)(x, t)
    e_c = pipe.denoiser(x, t, cond.context, cond.pooled)
    e_u = pipe.denoiser(x, t, uncond.context, uncond.pooled)
    torch.testing.assert_close(guided, e_u + 4.0 * (e_c - e_u), atol=1e-4, rtol=1e-4)  # batch-2 vs batch-1 rounding
    assert not torch.allclose(e_c, e_u, atol=1e-4)


def test_callback_and_negative_prompt():
    pipe = randomise(tiny_pipeline("unet"))
    seen = []
    pipe(
        "a red square",
        num_inference_steps=6,
        callback=lambda i, t, x: seen.append((i, int(t))),
        callback_steps=2,
    )
    assert [i for i, _ in seen] == [0, 2, 4]
    assert seen[0][1] > seen[1][1] > seen[2][1]
    with pytest.raises(ValueError, match="negative prompts"):
        pipe(["a", "b", "c"], negative_prompt=["x", "y"], num_inference_steps=1)
    g = torch.Generator
    plain = pipe("a red square", num_inference_steps=3, generator=g().manual_seed(0), output_type="pt").images
    neg = pipe(
        "a red square",
        negative_prompt="a blue circle",
        num_inference_steps=3,
        generator=g().manual_seed(0),
        output_type="pt",
    ).images
    assert not torch.allclose(plain, neg)


def test_flow_heun_and_ddpm_samplers_run_in_pipeline():
    flow = randomise(tiny_pipeline("dit", "flow"))
    euler = flow("a red square", num_inference_steps=4, output_type="pt").images
    heun = flow("a red square", num_inference_steps=4, sampler="heun", output_type="pt").images
    assert not torch.allclose(euler, heun)
    with pytest.raises(ValueError, match="deterministic"):
        flow("a red square", num_inference_steps=2, sampler="heun", eta=0.5)
    start = torch.randn(flow.latent_shape(1, None, None), generator=torch.Generator().manual_seed(5))
    stochastic = [
        flow("a red square", num_inference_steps=4, eta=1.0, generator=torch.Generator().manual_seed(i),
             latents=start, output_type="pt").images
        for i in (0, 0, 1)
    ]  # fmt: skip
    torch.testing.assert_close(stochastic[0], stochastic[1])
    assert not torch.allclose(stochastic[0], stochastic[2])  # same start, other step noise (eta = 0: equal)
    ddpm = randomise(tiny_pipeline("unet"))
    a = ddpm(
        "a red square",
        num_inference_steps=3,
        sampler="ddpm",
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
    ).images
    b = ddpm(
        "a red square",
        num_inference_steps=3,
        sampler="ddpm",
        generator=torch.Generator().manual_seed(2),
        output_type="pt",
    ).images
    assert not torch.allclose(a, b)  # ancestral sampling draws fresh noise


@pytest.mark.parametrize("backbone,process,vae", [("unet", "ddpm", True), ("dit", "flow", False)])
def test_save_load_round_trip_is_bit_identical(tmp_path, backbone, process, vae):
    pipe = randomise(tiny_pipeline(backbone, process, vae=vae))
    if vae:
        pipe.vae.config.scaling_factor = 0.77
    pipe.save_pretrained(tmp_path / "model")
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "model")
    kwargs = dict(num_inference_steps=3, guidance_scale=2.5, output_type="pt")
    a = pipe("a blue circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded("a blue circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(a, b)

    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "Text2ImagePipeline"
    assert index["denoiser"] == type(pipe.denoiser).__name__
    assert index["vae"] == ("AutoencoderKL" if vae else None)
    files = {p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert {
        "denoiser/config.json",
        "denoiser/model.safetensors",
        "text_encoder/model.safetensors",
        "noise_process/config.json",
        "tokenizer/tokenizer.json",
    } <= files
    assert not any(f.endswith((".bin", ".pt", ".ckpt", ".pkl")) for f in files)
    if vae:
        assert json.loads((tmp_path / "model/vae/config.json").read_text())["scaling_factor"] == 0.77


def test_from_pretrained_refuses_what_is_not_a_pipeline(tmp_path):
    with pytest.raises(NotAPipelineError, match="not a saved pipeline"):
        Text2ImagePipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "denoiser": "os.system"}))
    with pytest.raises(NotAPipelineError, match="unknown component class"):
        Text2ImagePipeline.from_pretrained(tmp_path)


@pytest.mark.slow
def test_compiled_denoiser_samples_the_same_images_and_saves_the_same_folder(tmp_path):
    eager = tiny_pipeline(vae=True, process="flow")
    eager.save_pretrained(tmp_path / "eager")
    compiled = Text2ImagePipeline.from_pretrained(tmp_path / "eager").compile()
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "pt"}
    a = eager(["a red square", "a blue circle"], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = compiled(["a red square", "a blue circle"], generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    compiled.save_pretrained(tmp_path / "compiled")
    again = Text2ImagePipeline.from_pretrained(tmp_path / "compiled")
    assert type(again.denoiser) is type(eager.denoiser)
    for (k1, v1), (k2, v2) in zip(eager.denoiser.state_dict().items(), again.denoiser.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
