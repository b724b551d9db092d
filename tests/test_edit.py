"""CycleDiffusion on this project's models: exact reconstruction, batching, baselines, a real colour edit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cyclediffusion import CycleDiffusionPipeline, translate
from cyclediffusion.pipelines.implicit_mask import implicit_mask

from helpers import RED, randomise_zeros, tiny_pipeline, train

MODELS = [  # (backbone, process, VAE, process options)
    ("unet", "ddpm", False, {"prediction_type": "epsilon"}),
    (
        "unet",
        "ddpm",
        True,
        {"prediction_type": "v_prediction", "beta_schedule": "cosine", "timestep_spacing": "trailing"},
    ),
    ("dit", "ddpm", False, {"prediction_type": "x0", "steps_offset": 1, "set_alpha_to_one": False}),
    ("dit", "flow", True, {}),
]


def cycle_pipeline(backbone="unet", process="ddpm", vae=False, seed=0, **options) -> CycleDiffusionPipeline:
    torch.manual_seed(seed)
    pipe = tiny_pipeline(backbone, process, vae=vae, **options)
    randomise_zeros(pipe.denoiser)
    return CycleDiffusionPipeline(**pipe.components).eval()


def pictures(n: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(9))


def gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("backbone,process,vae,options", MODELS)
def test_same_prompt_and_guidance_give_back_the_input(one_thread, backbone, process, vae, options):
    """The DPM-Encoder's noises decode to the encoded latent when nothing changes (every model kind)."""
    pipe = cycle_pipeline(backbone, process, vae, **options)
    image = pictures(2)
    x0 = pipe.image_latents(image, 2, 1, torch.Generator().manual_seed(3))
    out = pipe(
        ["a red square", "a blue circle"],
        ["a red square", "a blue circle"],
        image,
        num_inference_steps=12,
        guidance_scale=2.0,
        source_guidance_scale=2.0,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    assert (out - x0).abs().max() <= 1e-4
    changed = pipe(
        "a blue circle",
        "a red square",
        image[:1],
        num_inference_steps=12,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    assert (changed - x0[:1]).abs().max() > 1e-2  # a different target prompt does change the latent


@pytest.mark.parametrize("method", ["cycle", "sdedit"])
def test_batch_with_guidance_equals_single_runs(one_thread, method):
    pipe = cycle_pipeline("unet", "ddpm", vae=True)
    prompts, sources = ["a red square", "a blue circle", "two yellow circles"], ["a blue circle"] * 3
    image = pictures(3)
    kwargs = dict(num_inference_steps=8, guidance_scale=3.0, source_guidance_scale=1.5, eta=0.3, method=method)
    batch = pipe(prompts, sources, image, generator=gens(0, 3), output_type="latent", **kwargs).images
    for i in range(3):
        single = pipe(
            prompts[i], sources[i], image[i : i + 1], generator=gens(i, 1)[0], output_type="latent", **kwargs
        ).images
        # fp32 kernels sum in another order at batch 3: ~1e-5 after 8 guided steps; mixing rows would be ~1e-1
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-4, rtol=1e-4)


def test_images_per_prompt_and_one_image_for_many_prompts(one_thread):
    pipe = cycle_pipeline()
    out = pipe(
        ["a red square", "a blue circle"],
        "a blue circle",
        pictures(1),
        num_inference_steps=4,
        num_images_per_prompt=3,
        generator=gens(0, 6),
        output_type="np",
    ).images
    assert out.shape == (6, 16, 16, 3)
    assert np.isfinite(out).all()
    assert np.abs(out[0] - out[1]).max() > 0  # each image has its own noise


def test_ddim_inversion_is_exact_when_the_noise_estimate_is_constant(one_thread):
    """An untrained U-Net predicts eps = 0 everywhere, so the eta = 0 chain inverts exactly."""
    torch.manual_seed(0)
    pipe = CycleDiffusionPipeline(**tiny_pipeline("unet", "ddpm", prediction_type="epsilon").components)
    image = pictures(2)
    x0 = pipe.image_latents(image, 2, 1, None)
    out = pipe(
        ["a red square"] * 2,
        "a blue circle",
        image,
        num_inference_steps=10,
        guidance_scale=3.0,
        method="ddim_inversion",
        output_type="latent",
    ).images
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=1e-4)  # float error of 20 rescalings


def test_strength_zero_returns_the_input_and_latents_are_accepted(one_thread):
    pipe = cycle_pipeline(vae=True)
    x0 = pipe.image_latents(pictures(1), 1, 1, torch.Generator().manual_seed(0))
    out = pipe("a red square", "a blue circle", x0, strength=0.05, num_inference_steps=10, output_type="latent")
    torch.testing.assert_close(out.images, x0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"eta": 0.0}, "eta > 0"),
        ({"eta": -0.5}, "eta > 0"),
        ({"method": "magic"}, "unknown method"),
        ({"strength": 1.5}, "strength"),
        ({"image": None}, "image is required"),
        ({"source_prompt": ["a", "b", "c"]}, "source prompts"),
        ({"guidance_scale": -1.0}, "guidance"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs, message):
    pipe = cycle_pipeline()
    args = {"prompt": ["a red square", "a blue circle"], "source_prompt": "a blue circle", "image": pictures(1)}
    with pytest.raises(ValueError, match=message):
        pipe(**{**args, **kwargs}, num_inference_steps=2)


def test_translate_refuses_models_in_different_latent_spaces():
    a, b = cycle_pipeline(vae=True, seed=0), cycle_pipeline(vae=True, seed=1)
    with pytest.raises(ValueError, match="share their VAE"):
        translate(pictures(1), a, b, num_inference_steps=2)


def test_save_and_load_round_trip(tmp_path):
    pipe = cycle_pipeline(vae=True)
    pipe.save_pretrained(tmp_path / "model")
    loaded = CycleDiffusionPipeline.from_pretrained(tmp_path)  # a run folder holding model/
    kwargs = dict(num_inference_steps=3, output_type="latent")
    a = pipe("a red square", "a blue circle", pictures(1), generator=torch.Generator().manual_seed(0), **kwargs)
    b = loaded("a red square", "a blue circle", pictures(1), generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(a.images, b.images)


# ---------------------------------------------------------------- a trained model edits colours
SIZE, BACKGROUND = 16, -1.0
PURPLE = (1.0, -1.0, 1.0)


def shape_world() -> tuple[torch.Tensor, list[str]]:
    """Red and purple squares and discs of two sizes; the caption names only the colour, so the shape and size
    of an edit can come only from the DPM-Encoder's noises. (Red and purple lie on the same side of the black
    background, so the nearest purple image to a red one is the same shape recoloured.)"""
    yy, xx = torch.meshgrid(torch.arange(SIZE) - 7.5, torch.arange(SIZE) - 7.5, indexing="ij")
    images, captions = [], []
    for colour, caption in ((RED, "a red shape"), (PURPLE, "a purple shape")):
        for square in (True, False):
            for r in (3, 4):
                mask = (yy.abs() <= r) & (xx.abs() <= r) if square else yy**2 + xx**2 <= (r + 0.5) ** 2
                image = torch.full((3, SIZE, SIZE), BACKGROUND)
                for c in range(3):
                    image[c][mask] = colour[c]
                images.append(image)
                captions.append(caption)
    return torch.stack(images), captions


def object_mask(image: torch.Tensor) -> torch.Tensor:
    return (image - BACKGROUND).abs().amax(0) > 0.6


def trained_on_shapes(steps: int) -> tuple[CycleDiffusionPipeline, torch.Tensor]:
    images, captions = shape_world()
    torch.manual_seed(0)
    pipe = tiny_pipeline("unet", "ddpm", prediction_type="x0", beta_schedule="cosine")
    before, after = train(pipe, images, captions, steps=steps, lr=2e-3)
    assert after < 0.1 * before
    return CycleDiffusionPipeline(**pipe.components).eval(), images


@pytest.fixture(scope="module")
def trained(one_thread):
    """Trained until every seed tried (0-4) recolours all four shapes; at 300 steps some seeds recolour none."""
    return trained_on_shapes(800)


@pytest.fixture(scope="module")
def briefly_trained(one_thread):
    """The implicit mask reads where the captions' estimates part at half noise. A model that has memorised its 8
    images reads the colour off the noisy image there and barely listens to the caption, so the mask is read off
    a model trained for a shorter while."""
    return trained_on_shapes(300)


def test_colour_edit_changes_the_colour_and_keeps_the_shape(trained):
    pipe, images = trained
    reds = images[:4]
    ious = {}
    for method in ("cycle", "sdedit"):
        out = (
            pipe(
                ["a purple shape"] * 4,
                "a red shape",
                reds,
                strength=0.8,
                num_inference_steps=40,
                guidance_scale=2.0,
                eta=0.1,
                generator=gens(0, 4),
                output_type="pt",
                method=method,
            ).images
            * 2
            - 1
        )
        ious[method] = []
        for source, edited in zip(reds, out):
            m_src, m_out = object_mask(source), object_mask(edited)
            ious[method].append(float((m_src & m_out).sum() / (m_src | m_out).sum()))
            if method == "cycle":  # blue channel of purple is +1, red's -1
                assert edited[2, m_src].mean() > 0.5, f"{method}: not purple"
    cycle, sdedit = np.mean(ious["cycle"]), np.mean(ious["sdedit"])
    assert cycle >= 0.85 and min(ious["cycle"]) >= 0.85, f"CycleDiffusion mask IoU {ious['cycle']}"
    # SDEdit forgets the input's noise and can land on the other purple shape; the DPM-Encoder's noises keep it
    assert cycle >= sdedit, f"CycleDiffusion {ious['cycle']} should keep shapes as SDEdit {ious['sdedit']} does"


def test_implicit_mask_finds_the_object_whose_caption_changes(briefly_trained):
    """``mask_image="auto"``: where the purple caption's estimate departs from the red one's is the object; the
    edit recolours it and keeps every pixel outside the mask it read."""
    pipe, images = briefly_trained
    reds = images[:4]
    kwargs = dict(strength=0.8, num_inference_steps=40, guidance_scale=2.0, generator=gens(0, 4), output_type="pt")
    out = pipe(["a purple shape"] * 4, "a red shape", reds, mask_image="auto", **kwargs)
    x0 = pipe.image_latents(reds, 4, 1, None)
    src = pipe.prompt_guidance(["a red shape"] * 4, 1.0)
    tgt = pipe.prompt_guidance(["a purple shape"] * 4, 1.0)
    # read at a higher cut than the default (0.1, chosen on a model that composes): this briefly trained model's
    # estimates also part a little all over the background
    mask = implicit_mask(pipe, pipe, x0, src, tgt, torch.Generator().manual_seed(0), threshold=0.3)[:, 0].bool()
    ious, blues = [], []
    for source, edited, read in zip(reds, out.images * 2 - 1, mask):
        inside = object_mask(source)
        ious.append(float((inside & read).sum() / (inside | read).sum()))
        blues.append(float(edited[2, inside & read].mean()))  # red's blue channel: -1, purple's: about +1
        assert (read & ~inside).sum() < 0.2 * (~inside).sum()  # most of the background is read as unchanged
    # toward purple where it read the object: every image moves (red's -1 is where it starts) and most of them far
    # (the tiny model recolours the small shapes fully and the large ones partly, by seed: tried 0-4)
    assert min(blues) > -0.95 and np.mean(blues) > 0, f"blue inside the read mask {blues}"
    assert min(ious) >= 0.45 and np.mean(ious) >= 0.55, f"implicit mask IoU with the object {ious}"
    assert out.nfe > pipe(["a purple shape"] * 4, "a red shape", reds, **kwargs).nfe  # the reading is counted
    same = pipe(["a red shape"] * 4, "a red shape", reds, mask_image="auto", **kwargs).images * 2 - 1
    assert (same - reds).abs().max() < 1e-5  # equal prompts: an empty mask, the input back


def test_implicit_mask_refuses_other_strings():
    pipe = cycle_pipeline()
    with pytest.raises(ValueError, match="'auto'"):
        pipe("a blue circle", "a red square", pictures(1), num_inference_steps=4, mask_image="everywhere")


# ---------------------------------------------------------------- the commands
@pytest.fixture
def saved_model(tmp_path):
    from PIL import Image

    cycle_pipeline(vae=True).save_pretrained(tmp_path / "run" / "model")
    Image.fromarray((pictures(1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "in.png")
    return tmp_path


def test_cli_edit_and_translate_write_pngs(saved_model, capsys):
    from PIL import Image

    from cyclediffusion.cli import main

    common = ["--image", str(saved_model / "in.png"), "--steps", "4"]
    args = ["edit", "--model", str(saved_model / "run"), "--source-prompt", "a red square", "--prompt", "a blue circle"]
    assert main([*args, *common, "--num-images", "2", "--out", str(saved_model / "e.png")]) == 0
    assert Image.open(saved_model / "e_1.png").size == (16, 16) and (saved_model / "e.png").is_file()
    model = str(saved_model / "run")
    translate = ["translate", "--source-model", model, "--target-model", model, *common, "--method", "sdedit"]
    assert main([*translate, "--out", str(saved_model / "t.png")]) == 0
    assert Image.open(saved_model / "t.png").size == (16, 16)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--eta", "0"], "eta > 0"),
        (["--strength", "2"], "strength"),
        (["--image", "missing.png"], "not found"),
        (["--model", "nowhere"], "does not exist"),
    ],
)
def test_cli_edit_bad_input_is_one_line_and_exit_2(saved_model, capsys, monkeypatch, extra, message):
    from cyclediffusion.cli import main

    monkeypatch.chdir(saved_model)
    args = ["edit", "--model", "run", "--image", "in.png", "--source-prompt", "a", "--prompt", "b", "--steps", "2"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], err
