"""The seed's captioner: a tiny transformers Pix2Struct (built from a config, saved as safetensors) read through the
differentiable patch flattening, which equals the processor's, and trained against in the cycle loss."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import metrics, tiny_model, tiny_run, write_folder

from cyclediffusion.integrations.pix2struct import Pix2StructCaptioner, flattened_patches, is_pix2struct_folder
from cyclediffusion.training import CycleConfig, DataOptions, ModelOptions, train_text2image
from cyclediffusion.training.caption_loss import CycleLoss
from cyclediffusion.training.train import load_captioner

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from tiny_sd import tiny_pix2struct_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pix2struct_folder(tmp_path_factory.mktemp("pix2struct"))


def test_patches_equal_the_processors_and_carry_gradients(folder):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    for shape in [(32, 32), (24, 40), (13, 7)]:
        array = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        expected = processor(images=Image.fromarray(array), max_patches=64, return_tensors="pt")
        pixels = torch.tensor(array).permute(2, 0, 1)[None].float() / 127.5 - 1
        patches, mask = flattened_patches(pixels, 64, (4, 4))
        torch.testing.assert_close(patches, expected["flattened_patches"], atol=1e-4, rtol=0)
        torch.testing.assert_close(mask, expected["attention_mask"].float())
    pixels = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    flattened_patches(pixels, 64, (4, 4))[0].square().sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_captioner_loss_is_transformers_loss(folder):
    captioner = load_captioner(str(folder), image_size=16)
    assert isinstance(captioner, Pix2StructCaptioner) and is_pix2struct_folder(folder)
    pixels = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    captions = ["a red square", "a blue circle above a green triangle"]
    mean = captioner.loss(pixels, captions)
    per_caption = captioner.loss(pixels, captions, reduction="none")
    labels = captioner.labels(captions)
    counts = (labels != -100).sum(1).float()
    torch.testing.assert_close(mean, (per_caption * counts).sum() / counts.sum())
    mean.backward()
    assert pixels.grad.abs().sum() > 0
    assert len(captioner(pixels.detach(), max_new_tokens=4).captions) == 2


def test_cycle_training_step_with_pix2struct(tmp_path, folder):
    data = DataOptions(data=str(write_folder(tmp_path / "data")), image_size=16)
    model = ModelOptions(**{**vars(tiny_model()), "captioner": str(folder), "captioner_device": "cpu"})
    train_text2image(data, tiny_run(tmp_path / "run", steps=2), model)
    assert all(r["train/cycle_loss"] > 0 for r in metrics(tmp_path / "run"))

    # one optimiser step in memory: the denoiser moves, the frozen captioner does not
    from test_cycle import build, make_batch

    module = build("unet", "flow", "pixels", captioner=False)
    module.cycle = CycleLoss(
        CycleConfig(weight=1.0, fraction=1.0), load_captioner(str(folder), 16), module.noise_process
    )
    before = {k: v.clone() for k, v in module.captioner.captioner.state_dict().items()}
    denoiser = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    out = module.step_losses(make_batch(module, "pixels", 4))
    assert out.cycle is not None and out.cycle > 0
    out.loss.backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert all(p.grad is None for p in module.captioner.captioner.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.captioner.captioner.state_dict().items())
    assert any(not torch.equal(denoiser[k], v) for k, v in module.denoiser.state_dict().items())
