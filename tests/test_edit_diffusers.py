"""CycleDiffusion with diffusers' Stable Diffusion components matches diffusers' own ``CycleDiffusionPipeline``.

Tiny components are built from configs (nothing is downloaded); the CLIP tokenizer reads a small local vocab.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from cyclediffusion import CycleDiffusionPipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from tiny_sd import tiny_stable_diffusion  # noqa: E402


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("clip"))


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def generators(seed: int, n: int | None):
    return (
        torch.Generator().manual_seed(seed)
        if n is None
        else [torch.Generator().manual_seed(seed + i) for i in range(n)]
    )


CASES = [
    # (prompts, n images, steps, guidance, per prompt, generator list)
    (["a red circle"], 1, 10, 3.0, 1, False),
    (["a red circle"], 1, 2, 3.0, 1, False),
    (["a red circle"], 1, 10, 1.0, 1, False),
    (["a red circle"], 1, 10, 1.0, 2, False),  # diffusers' guided branch only handles batch 1
    (["a red circle", "a green square"], 2, 10, 1.0, 1, False),
    (["a red circle", "a green square"], 2, 10, 1.0, 1, True),
]


@pytest.mark.parametrize("prompts,n_images,steps,guidance,per_prompt,as_list", CASES)
def test_matches_diffusers_cycle_diffusion(components, prompts, n_images, steps, guidance, per_prompt, as_list):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.CycleDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    theirs.set_progress_bar_config(disable=True)
    ours = CycleDiffusionPipeline.from_diffusers(**components)
    sources = ["a blue circle"] * len(prompts)
    kwargs = dict(
        strength=0.8,
        num_inference_steps=steps,
        guidance_scale=guidance,
        source_guidance_scale=1.0,
        eta=0.1,
        num_images_per_prompt=per_prompt,
        output_type="np",
    )
    count = len(prompts) * per_prompt if as_list else None
    image = images(n_images) if n_images > 1 else images(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(
            prompt=prompts, source_prompt=sources, image=image, generator=generators(5, count), **kwargs
        ).images
    got = ours(prompt=prompts, source_prompt=sources, image=image, generator=generators(5, count), **kwargs).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected - 0.5).mean()  # not trivially equal (e.g. blank)


def test_applies_diffusers_steps_offset_fix_up(components):
    """diffusers' constructor rewrites an outdated ``steps_offset`` to 1 (with a warning); so does from_diffusers."""
    old = diffusers.DDIMScheduler.from_config({**dict(components["scheduler"].config), "steps_offset": 0})
    parts = {**components, "scheduler": old}
    with pytest.warns(UserWarning, match="steps_offset=0"):
        ours = CycleDiffusionPipeline.from_diffusers(**parts)
    assert old.config.steps_offset == 0  # the caller's scheduler is left alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.CycleDiffusionPipeline(
            **{**parts, "scheduler": diffusers.DDIMScheduler.from_config(old.config)},
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", source_prompt="a blue circle", image=images(1)[0], strength=0.8,
                  num_inference_steps=10, guidance_scale=3.0, eta=0.1, output_type="np")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert np.abs(got - expected).max() <= 1e-4


def test_skips_the_unconditional_source_pass(components):
    """With source guidance 1 the source chain needs no unconditional prediction: 3 rows per call, not 4."""
    ours = CycleDiffusionPipeline.from_diffusers(**components)
    rows = []
    hook = ours.denoiser.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    ours(
        "a red circle",
        "a blue circle",
        images(1)[0],
        num_inference_steps=5,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    hook.remove()
    assert rows == [3] * 4


def test_loads_a_saved_stable_diffusion_folder(components, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = diffusers.StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    sd.save_pretrained(tmp_path / "sd")
    loaded = CycleDiffusionPipeline.from_pretrained(tmp_path / "sd")
    direct = CycleDiffusionPipeline.from_diffusers(**components)
    kwargs = dict(num_inference_steps=4, guidance_scale=2.0, output_type="np")
    a = loaded("a red circle", "a blue circle", images(1)[0], generator=torch.Generator().manual_seed(1), **kwargs)
    b = direct("a red circle", "a blue circle", images(1)[0], generator=torch.Generator().manual_seed(1), **kwargs)
    np.testing.assert_allclose(a.images, b.images, atol=1e-6)


def test_refuses_schedulers_it_cannot_reproduce(components):
    clipped = diffusers.DDIMScheduler(clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample"):
        CycleDiffusionPipeline.from_diffusers(**{**components, "scheduler": clipped})
