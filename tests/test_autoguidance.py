"""Autoguidance (``guide=`` / ``--guide-model``): the sampler moves away from a weaker model's conditional prediction
on top of classifier-free guidance, ``uncond + w (cond - uncond) + s (cond - guide_cond)``."""

from __future__ import annotations

import json

import pytest
import torch

from cyclediffusion import Text2ImagePipeline
from cyclediffusion.pipelines.base import Guidance

from helpers import randomise_zeros, tiny_pipeline

PROMPTS = ["a red square", "a blue circle"]


def pipeline(seed: int, process: str = "flow", **kwargs) -> Text2ImagePipeline:
    torch.manual_seed(seed)
    pipe = tiny_pipeline("dit", process, **kwargs)
    randomise_zeros(pipe.denoiser)
    return pipe


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_the_prediction_is_guidance_plus_the_step_away_from_the_guide(scale: float) -> None:
    good, weak = pipeline(0), pipeline(1)
    guidance = good.prompt_guidance(PROMPTS, scale)
    guide_cond = weak.encode_prompt(PROMPTS)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.full((2,), 700.0)
    with torch.no_grad():
        got = good.autoguided_model_fn(guidance, weak, guide_cond, 2.0)(x, t)
        cond = good.guided_predictions([x], t, [Guidance(guidance.cond)])[0]
        guided = good.guided_predictions([x], t, [guidance])[0]
        weak_cond = weak.guided_predictions([x], t, [Guidance(guide_cond)])[0]
    torch.testing.assert_close(got, guided + 2.0 * (cond - weak_cond), atol=1e-5, rtol=0)
    assert (weak_cond - cond).abs().max() > 1e-2  # the guide does predict something else


def test_a_model_guided_by_itself_samples_as_without_a_guide_and_a_weaker_guide_changes_the_images() -> None:
    good, weak = pipeline(0), pipeline(1)
    kwargs = dict(num_inference_steps=4, guidance_scale=2.0, output_type="latent")
    plain = good(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    itself = good(PROMPTS, generator=torch.Generator().manual_seed(0), guide=good, guide_scale=3.0, **kwargs).images
    torch.testing.assert_close(itself, plain, atol=1e-5, rtol=0)
    guided = good(PROMPTS, generator=torch.Generator().manual_seed(0), guide=weak, guide_scale=3.0, **kwargs).images
    assert (guided - plain).abs().max() > 1e-2


@pytest.mark.parametrize(
    "guide,scale,message",
    [
        (lambda: pipeline(1, "ddpm"), 3.0, "same noise process"),
        (lambda: pipeline(1, vae=True), 3.0, "same latents"),
        (lambda: pipeline(1), -1.0, "non-negative"),
    ],
)
def test_a_guide_of_another_kind_is_refused(guide, scale: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipeline(0)(PROMPTS, num_inference_steps=2, guide=guide(), guide_scale=scale)


def test_cli_sample_and_eval_take_a_guide_model(tmp_path, capsys) -> None:
    import json

    from cyclediffusion.cli import main

    pipeline(0).save_pretrained(tmp_path / "good")
    pipeline(1).save_pretrained(tmp_path / "weak")
    base = [
        "sample",
        "--model",
        str(tmp_path / "good"),
        "--prompt",
        "a red square",
        "--steps",
        "3",
        "--dtype",
        "float32",
    ]
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "--guide-model", str(tmp_path / "weak"), "--out", str(tmp_path / "guided.png")]) == 0
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "guided.png").read_bytes()
    args = ["eval", "--model", str(tmp_path / "good"), "--samples-per-prompt", "1", "--per-kind", "1", "--steps", "2"]
    for name, extra in (("plain", []), ("guided", ["--guide-model", str(tmp_path / "weak"), "--guide-scale", "5"])):
        assert main([*args, *extra, "--out", str(tmp_path / f"eval_{name}")]) == 0
    reports = [json.loads((tmp_path / f"eval_{n}" / "shapes_eval.json").read_text()) for n in ("plain", "guided")]
    assert reports[0]["records"] != reports[1]["records"]
    capsys.readouterr()
    assert main([*base, "--guide-model", str(tmp_path / "nowhere")]) == 2


def carrying(good: Text2ImagePipeline, weak: Text2ImagePipeline, **kwargs) -> Text2ImagePipeline:
    """``good`` with ``weak`` as its own guide."""
    return Text2ImagePipeline(**good.components, guidance_scale=4.0, guide=weak, **kwargs)


def test_a_saved_model_carries_its_guide_and_samples_with_it_by_default(tmp_path) -> None:
    from safetensors.torch import load_file

    good, weak = pipeline(0), pipeline(1)
    carrying(good, weak, guide_scale=2.5).save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert (index["_guidance_scale"], index["_guide_scale"], index["_guide_guidance_scale"]) == (4.0, 2.5, 2.0)
    saved = load_file(tmp_path / "m" / "guide" / "denoiser" / "model.safetensors")
    for name, p in weak.denoiser.state_dict().items():
        torch.testing.assert_close(saved[name], p, atol=0, rtol=0)
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "m")
    assert loaded.guide is not None and (loaded.guide_scale, loaded.guide_guidance_scale) == (2.5, 2.0)

    def draw(pipe: Text2ImagePipeline, **kwargs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return pipe(PROMPTS, num_inference_steps=3, output_type="latent", generator=gen, **kwargs).images

    explicit = draw(good, guide=weak, guide_scale=2.5, guidance_scale=2.0)
    torch.testing.assert_close(draw(loaded), explicit, atol=1e-5, rtol=0)  # the folder's recipe, guide and all
    plain = Text2ImagePipeline(**good.components, guidance_scale=4.0)
    torch.testing.assert_close(draw(loaded, guide_scale=0.0), draw(plain), atol=1e-5, rtol=0)  # 0: the plain model
    assert (draw(loaded) - draw(plain)).abs().max() > 1e-2
    torch.testing.assert_close(
        draw(loaded, guidance_scale=3.0), draw(good, guide=weak, guide_scale=2.5, guidance_scale=3.0), atol=1e-5, rtol=0
    )
    other = pipeline(2)
    torch.testing.assert_close(draw(loaded, guide=other), draw(good, guide=other, guide_scale=2.5, guidance_scale=2.0),
                               atol=1e-5, rtol=0)  # fmt: skip

    loaded.to(dtype=torch.bfloat16)  # the guide moves with the model
    assert next(loaded.guide.denoiser.parameters()).dtype == torch.bfloat16
    plain.save_pretrained(tmp_path / "plain")
    assert "_guide_scale" not in json.loads((tmp_path / "plain" / "model_index.json").read_text())
    assert Text2ImagePipeline.from_pretrained(tmp_path / "plain").guide is None


def test_a_carried_guide_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="same noise process"):
        carrying(pipeline(0), pipeline(1, "ddpm"))
    with pytest.raises(ValueError, match="non-negative"):
        carrying(pipeline(0), pipeline(1), guide_scale=-1.0)


def test_cli_sample_uses_the_models_own_guide_unless_told_otherwise(tmp_path) -> None:
    from cyclediffusion.cli import main
    from cyclediffusion.pipelines import CycleDiffusionPipeline

    good, weak = pipeline(0), pipeline(1)
    carrying(good, weak).save_pretrained(tmp_path / "carrying")
    Text2ImagePipeline(**good.components, guidance_scale=4.0).save_pretrained(tmp_path / "plain")
    weak.save_pretrained(tmp_path / "weak")
    base = ["sample", "--prompt", "a red square", "--steps", "3", "--dtype", "float32"]

    def png(model: str, *extra: str) -> bytes:
        out = tmp_path / f"{model}{'_'.join(extra)}.png"
        assert main([*base, "--model", str(tmp_path / model), *extra, "--out", str(out)]) == 0
        return out.read_bytes()

    by_default = png("carrying")
    assert by_default == png("plain", "--guide-model", str(tmp_path / "weak"), "--guidance", "2")
    assert png("carrying", "--guide-scale", "0") == png("plain")
    assert by_default != png("plain")
    assert CycleDiffusionPipeline.from_pretrained(tmp_path / "carrying").guidance_scale == 4.0  # edits: plain guidance
