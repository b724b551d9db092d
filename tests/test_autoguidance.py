"""Autoguidance (``guide=`` / ``--guide-model``): the sampler moves away from a weaker model's conditional prediction
on top of classifier-free guidance, ``uncond + w (cond - uncond) + s (cond - guide_cond)``."""

from __future__ import annotations

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
