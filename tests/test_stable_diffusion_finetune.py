"""The seed's system end to end: a tiny diffusers Stable Diffusion folder (DDPM scheduler) fine-tuned by
``cyclediffusion train --init-from`` with the cycle loss read by a tiny Pix2Struct, exported as a diffusers folder
that ``StableDiffusionPipeline`` loads and samples; the frozen parts stay as they were."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import metrics

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from tiny_sd import tiny_pix2struct_folder, tiny_stable_diffusion_folder  # noqa: E402


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_stable_diffusion_with_a_pix2struct_cycle_loss(tmp_path, capsys):
    """The README's commands: tiny folders, shapes data, ``cyclediffusion train --init-from SD --captioner P2S``."""
    from cyclediffusion.cli import main

    source = tiny_stable_diffusion_folder(tmp_path)
    reader = tiny_pix2struct_folder(tmp_path / "pix2struct")
    original = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    assert main(["data", "shapes", "--out", str(tmp_path / "data"), "--n", "8", "--size", "32"]) == 0
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(run), "--image-size", "32", "--cache-latents"]
    args += ["--init-from", str(source), "--captioner", str(reader), "--no-train-text-encoder", "--steps", "2"]
    assert main([*args, "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--no-progress"]) == 0
    rows = metrics(run)
    assert len(rows) == 2 and all(r["train/cycle_loss"] > 0 for r in rows)

    tuned = diffusers.StableDiffusionPipeline.from_pretrained(run / "model", safety_checker=None)
    assert not list((run / "model").rglob("*.bin"))  # safetensors only
    assert changed(state(original.unet), state(tuned.unet))
    assert not changed(state(original.vae), state(tuned.vae))
    assert not changed(state(original.text_encoder), state(tuned.text_encoder))
    image = tuned("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
