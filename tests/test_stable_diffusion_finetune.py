"""The seed's system end to end: a tiny diffusers Stable Diffusion folder (DDPM scheduler) fine-tuned by
``cyclediffusion train --init-from`` with the cycle loss read by a tiny Pix2Struct, exported as a diffusers folder
that ``StableDiffusionPipeline`` loads and samples; the frozen parts stay as they were."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pix2struct import tiny_pix2struct_folder
from test_training import metrics, tiny_run, write_folder

from cyclediffusion.training import DataOptions, ModelOptions, train_text2image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from tiny_sd import tiny_stable_diffusion  # noqa: E402


def sd_folder(path: Path) -> Path:
    parts = tiny_stable_diffusion(path / "clip")
    parts["scheduler"] = diffusers.DDPMScheduler.from_config(parts["scheduler"].config)  # the seed's scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = diffusers.StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    sd.save_pretrained(path / "sd", safe_serialization=True)
    return path / "sd"


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_stable_diffusion_with_a_pix2struct_cycle_loss(tmp_path):
    source = sd_folder(tmp_path)
    original = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    data = DataOptions(data=str(write_folder(tmp_path / "data", n=8, size=32)), image_size=32, cache_latents=True)
    model = ModelOptions(
        init_from=str(source), captioner=str(tiny_pix2struct_folder(tmp_path / "p2s")), train_text_encoder=False
    )
    out = train_text2image(data, tiny_run(tmp_path / "run", steps=2, batch_size=2, lr=1e-2), model)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 2 and all(r["train/cycle_loss"] > 0 for r in rows)

    tuned = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert not list(Path(out).rglob("*.bin"))  # safetensors only
    assert changed(state(original.unet), state(tuned.unet))
    assert not changed(state(original.vae), state(tuned.vae))
    assert not changed(state(original.text_encoder), state(tuned.text_encoder))
    image = tuned("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
