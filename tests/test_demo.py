"""The demo end to end on a tiny budget: data, VAE, text-to-image model, grid and report."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from cyclediffusion import FlowMatching, Text2ImagePipeline, precision
from cyclediffusion.demo import LR, demo_lr, demo_prompts, run_demo


def test_demo_writes_models_grid_and_report(tmp_path):
    report = run_demo(out=tmp_path / "demo", minutes=5, n=256, max_steps=(8, 8), samples_per_prompt=1)
    out = tmp_path / "demo"
    text = report.read_text()
    for stage in ("| data |", "| vae |", "| text-to-image |", "| sampling |", "| total |"):
        assert stage in text
    assert "| vae | " in text and "| 8 |" in text  # both runs stopped at their step cap
    vae = json.loads((out / "vae" / "model" / "config.json").read_text())
    assert vae["scaling_factor"] != 1.0 and vae["shift_factor"] != 0.0  # measured on the data
    assert "The VAE's ShapesEval ceiling" in text and "binding 0.0" in text  # 8 steps reconstruct no binding
    grid = Image.open(out / "samples.png")
    assert grid.size[1] > grid.size[0] > 0  # 6 colour rows, 3 shape columns
    pipe = Text2ImagePipeline.from_pretrained(out / "t2i" / "model")
    assert isinstance(pipe.noise_process, FlowMatching)  # the demo's recipe (DDPM learns shapes slower)
    images = pipe(demo_prompts()[:2], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    rows = (out / "data" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 256 and not any("purple triangle" in row for row in rows)  # the held-out pair
    scores = json.loads((out / "t2i" / "eval" / "shapes_eval.json").read_text())
    assert scores["categories"]["held_out"]["n"] > 0  # the report scores the pair it never trained on
    assert f"| {scores['overall']:.3f} |" in text  # and its table is that evaluation's
    guide = Text2ImagePipeline.from_pretrained(out / "t2i" / "guide")  # autoguidance's weaker copy: step 4 of 8
    assert any(not torch.equal(a, b) for a, b in zip(guide.denoiser.parameters(), pipe.denoiser.parameters()))
    assert pipe.guide is not None  # which the model carries, so that `sample` and `eval` draw as the report did
    for a, b in zip(guide.denoiser.parameters(), pipe.guide.denoiser.parameters()):
        assert torch.equal(a, b)
    options = yaml.safe_load((out / "t2i" / "options.yaml").read_text())
    assert options["run"]["lr"] == demo_lr()  # the rate for this machine's speed


@pytest.mark.parametrize(
    "cuda,gpu_bf16,cpu_bf16,rate",
    [
        (False, False, False, "cpu-fp32"),  # an AVX2-only CPU: fp32, about 1000 steps in the demo
        (False, False, True, "fast"),  # AVX512_BF16 or AMX: bf16, 2100-2500 steps
        (True, True, False, "fast"),
        (True, False, False, "fast"),  # a GPU without bf16 trains in fp32 but still makes many steps
    ],
)
def test_the_demo_rate_follows_the_machine_speed(monkeypatch, cuda, gpu_bf16, cpu_bf16, rate):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: gpu_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: (cpu_bf16, "flags"))
    assert demo_lr() == LR[rate]
    assert LR["cpu-fp32"] > LR["fast"]
