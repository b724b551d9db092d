"""The edit core's methods: exact reconstruction for each (every model kind, batches), masks that keep everything
outside as the source's, network evaluations per edit, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_edit import MODELS, cycle_pipeline, pictures, saved_model  # noqa: F401

from cyclediffusion.pipelines.edit import MASKED_METHODS, RESAMPLED_METHODS


def methods_for(process: str) -> list[str]:
    return ["cycle", "ef_ddpm"] + (["flowedit"] if process == "flow" else [])


CASES = [(*model, method) for model in MODELS for method in methods_for(model[1])]


@pytest.mark.parametrize("backbone,process,vae,options,method", CASES)
def test_each_method_gives_back_the_input_when_nothing_changes(one_thread, backbone, process, vae, options, method):
    pipe = cycle_pipeline(backbone, process, vae, **options)
    image = pictures(2)
    x0 = pipe.image_latents(image, 2, 1, torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=12, guidance_scale=2.0, source_guidance_scale=2.0, output_type="latent",
                  eta=1.0 if method == "ef_ddpm" else 0.1, method=method)  # fmt: skip
    prompts = ["a red square", "a blue circle"]
    out = pipe(prompts, prompts, image, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert (out - x0).abs().max() <= 1e-4
    changed = pipe(prompts[::-1], prompts, image, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert (changed - x0).abs().max() > 1e-2


def square_mask(size: int = 16, lo: int = 4, hi: int = 12) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 255
    return Image.fromarray(mask, mode="L")


@pytest.mark.parametrize("method", MASKED_METHODS)
def test_a_mask_keeps_everything_outside_as_the_source(one_thread, method):
    process = "flow" if method == "flowedit" else "ddpm"
    pipe = cycle_pipeline("unet", process, vae=True)
    image = pictures(1)
    kwargs = dict(num_inference_steps=8, guidance_scale=3.0, method=method, eta=0.5, mask_image=square_mask())
    out = pipe("a blue circle", "a red square", image, generator=torch.Generator().manual_seed(0), output_type="np",
               **kwargs).images  # fmt: skip
    source = image[0].permute(1, 2, 0).numpy()
    outside = np.asarray(square_mask()) == 0
    assert np.abs(out[0][outside] - source[outside]).max() < 1e-6  # PSNR outside: infinite
    assert np.abs(out[0][~outside] - source[~outside]).mean() > 1e-2  # and the inside is edited
    latents = pipe("a blue circle", "a red square", image, generator=torch.Generator().manual_seed(0),
                   output_type="latent", **kwargs).images  # fmt: skip
    x0 = pipe.image_latents(image, 1, 1, torch.Generator().manual_seed(0))
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1:3, 1:3] = False  # latent cells that touch the mask are editable (4x down: pixels 4..11 -> cells 1..2)
    torch.testing.assert_close(latents[0][:, keep], x0[0][:, keep])
    pil = pipe("a blue circle", "a red square", image, generator=torch.Generator().manual_seed(0), **kwargs).images
    expected = (source * 255).round().astype(np.uint8)
    assert (np.asarray(pil[0])[outside] == expected[outside]).all()


@pytest.mark.parametrize("method", RESAMPLED_METHODS)
def test_resampling_redraws_only_inside_the_mask_and_costs_its_passes(one_thread, method):
    """RePaint's resampling: each masked step but the last taken 1 + r times; the outside stays the source's, the
    inside changes, the network calls grow by the extra passes, and an edit that changes nothing stays exact."""
    pipe = cycle_pipeline("unet", "flow", vae=True)
    image = pictures(1)
    kwargs = dict(num_inference_steps=10, strength=0.5, guidance_scale=3.0, method=method, eta=0.5,
                  mask_image=square_mask(), output_type="latent")  # fmt: skip

    def run(prompt: str, resample: int, **more):
        return pipe(prompt, "a red square", image, generator=torch.Generator().manual_seed(0), resample=resample,
                    **kwargs, **more)  # fmt: skip

    once, twice = run("a blue circle", 0), run("a blue circle", 2)
    rows = 2 if method == "sdedit" else 3  # per step: target cond + uncond, and the source branch's call
    assert once.nfe == 5 * rows and twice.nfe == (5 + 2 * 4) * rows  # the last step is taken once
    x0 = pipe.image_latents(image, 1, 1, torch.Generator().manual_seed(0))
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1:3, 1:3] = False
    torch.testing.assert_close(twice.images[0][:, keep], x0[0][:, keep])
    assert (twice.images[0][:, ~keep] - once.images[0][:, ~keep]).abs().mean() > 1e-2
    if method != "sdedit":  # the coupled methods give the input back when nothing changes, resampled or not
        assert (run("a red square", 2, source_guidance_scale=3.0).images - x0).abs().max() <= 1e-4


def test_a_lower_auto_mask_cut_lets_more_of_the_image_change(one_thread):
    """``mask_threshold`` cuts the mask read from the model: each lower cut marks a superset of the cells a higher
    one marks, so the edit keeps fewer of the input's pixels exactly; the default is the module's cut."""
    from cyclediffusion.pipelines.implicit_mask import THRESHOLD

    pipe = cycle_pipeline("unet", "flow", vae=True)
    image = pictures(1)

    def kept(**cut) -> np.ndarray:
        out = pipe("a blue circle", "a red square", image, generator=torch.Generator().manual_seed(0), output_type="np",
                   num_inference_steps=6, guidance_scale=3.0, mask_image="auto", **cut).images[0]  # fmt: skip
        return (out * 255).round() == (image[0].permute(1, 2, 0).numpy() * 255).round()

    cuts = [kept(mask_threshold=c) for c in (0.05, 0.3, 0.6, 0.95)]
    shares = [float(k.all(axis=-1).mean()) for k in cuts]
    assert shares == sorted(shares) and shares[0] < shares[-1], shares
    assert all((low <= high).all() for low, high in zip(cuts, cuts[1:]))  # a pixel kept at a low cut stays kept
    assert (kept() == kept(mask_threshold=THRESHOLD)).all()


def test_flowedit_cannot_resample():
    pipe = cycle_pipeline("unet", "flow", vae=True)
    with pytest.raises(ValueError, match="cannot resample"):
        pipe("a blue circle", "a red square", pictures(1), method="flowedit", mask_image=square_mask(), resample=1,
             num_inference_steps=2)  # fmt: skip


def test_on_a_flow_model_edit_friendly_inversion_tends_to_flowedit(one_thread):
    """On the flow path a deterministic step is ``x + (t' - t) v``, so ef_ddpm's coupled update
    ``x_tgt' = x_src' + x_tgt - x_src + (t' - t)(v_tgt - v_src)`` with fresh noisings of the image is FlowEdit's with
    ``z = x_tgt - x_src + x0``, drawn from the same noise; eta > 0 only shortens the noise coefficient of the DDIM mean
    (by a term in eta squared). So the two agree ever more closely as eta falls (Shapes-PIE's near-equal rows)."""
    pipe = cycle_pipeline("unet", "flow", vae=True)
    image = pictures(1)
    kwargs = dict(num_inference_steps=10, strength=0.8, guidance_scale=3.0, output_type="latent")

    def edit(method: str, eta: float = 0.1) -> torch.Tensor:
        return pipe("a blue circle", "a red square", image, generator=torch.Generator().manual_seed(5),
                    method=method, eta=eta, **kwargs).images  # fmt: skip

    flowedit = edit("flowedit")
    gaps = {eta: (edit("ef_ddpm", eta) - flowedit).abs().max().item() for eta in (0.1, 0.01)}
    assert gaps[0.1] < 1e-2 and gaps[0.01] < gaps[0.1] / 10
    assert (edit("cycle") - flowedit).abs().max() > 5e-2  # the posterior chain is another source branch


def test_network_evaluations_per_edit(one_thread):
    pipe = cycle_pipeline("unet", "flow", vae=True)
    image = pictures(1)
    kwargs = dict(num_inference_steps=10, strength=0.5, guidance_scale=3.0, source_guidance_scale=1.0)
    # 5 steps run; target cond + uncond and source cond (no unconditional pass at guidance 1) per step
    per_step = {"cycle": 3, "ef_ddpm": 3, "flowedit": 3, "sdedit": 2, "ddim_inversion": 3}
    for method, rows in per_step.items():
        out = pipe("a blue circle", "a red square", image, method=method, eta=0.5, output_type="latent", **kwargs)
        assert out.nfe == 5 * rows, method


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mask_image": square_mask().convert("RGB")}, "single-channel"),
        ({"mask_image": np.full((16, 16), 0.5)}, "binary"),
        ({"mask_image": square_mask(8, 2, 6)}, "mask_image is 8x8 but the image is 16x16"),
        ({"mask_image": np.zeros((3, 16, 16))}, "one channel"),
        ({"mask_image": square_mask(), "method": "ddim_inversion"}, "no source branch"),
        ({"mask_image": [square_mask()] * 3}, "3 masks for 2 prompts"),
        ({"method": "flowedit"}, "flow-matching"),
        ({"method": "ef_ddpm", "eta": 0.0}, "eta > 0"),
        ({"resample": 1}, "give mask_image too"),
        ({"resample": -1, "mask_image": square_mask()}, "whole number"),
        ({"resample": 1.5, "mask_image": square_mask()}, "whole number"),
        ({"resample": 1, "mask_image": square_mask(), "method": "ddim_inversion"}, "no source branch"),
        ({"mask_threshold": 0.3}, "give mask_image='auto' too"),
        ({"mask_threshold": 0.3, "mask_image": square_mask()}, "give mask_image='auto' too"),
        ({"mask_threshold": 0.0, "mask_image": "auto"}, r"mask threshold must be a number in \(0, 1\), got 0.0"),
        ({"mask_threshold": 1.0, "mask_image": "auto"}, "in \\(0, 1\\)"),
        ({"mask_threshold": True, "mask_image": "auto"}, "got True"),
    ],
)
def test_bad_masks_and_methods_are_refused_clearly(kwargs, message):
    pipe = cycle_pipeline()
    args = {"prompt": ["a red square", "a blue circle"], "source_prompt": "a blue circle", "image": pictures(1)}
    with pytest.raises(ValueError, match=message):
        pipe(**{**args, **kwargs}, num_inference_steps=2)


def test_cli_edit_with_a_mask(saved_model, capsys):  # noqa: F811
    from cyclediffusion.cli import main

    square_mask().save(saved_model / "mask.png")
    square_mask().convert("RGB").save(saved_model / "rgb.png")
    args = ["edit", "--model", str(saved_model / "run"), "--image", str(saved_model / "in.png")]
    args += ["--source-prompt", "a red square", "--prompt", "a blue circle", "--steps", "4", "--method", "ef_ddpm"]
    args += ["--eta", "1"]
    assert main([*args, "--mask", str(saved_model / "mask.png"), "--out", str(saved_model / "e.png")]) == 0
    edited, source = np.asarray(Image.open(saved_model / "e.png")), np.asarray(Image.open(saved_model / "in.png"))
    outside = np.asarray(square_mask()) == 0
    assert (edited[outside] == source[outside]).all()
    out = saved_model / "r.png"
    assert main([*args, "--mask", str(saved_model / "mask.png"), "--resample", "1", "--out", str(out)]) == 0
    resampled = np.asarray(Image.open(out))
    assert (resampled[outside] == source[outside]).all() and (resampled[~outside] != edited[~outside]).any()
    capsys.readouterr()
    assert main([*args, "--resample", "1"]) == 2  # no mask
    assert "give mask_image too" in capsys.readouterr().err
    assert main([*args, "--mask", str(saved_model / "rgb.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "single-channel" in err[0]
    assert main([*args, "--mask", "auto", "--mask-threshold", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask threshold must be a number in (0, 1), got 1.5" in err[0]
    assert main([*args, "--mask", str(saved_model / "mask.png"), "--mask-threshold", "0.3"]) == 2
    assert "give mask_image='auto' too" in capsys.readouterr().err
