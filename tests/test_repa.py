"""Representation alignment: the projector learns to match a frozen encoder, gradients stop at the encoder, the term
switches off after its share of the run, EMA copies align their own layer, and nothing of it is exported."""

from __future__ import annotations

import copy

import pytest
import torch
from test_captioner import tiny_captioner
from test_training import metrics, tiny_model, tiny_run, write_folder

from cyclediffusion import create_noise_process
from cyclediffusion.pipelines.caption import CaptionPipeline
from cyclediffusion.training import DataOptions, ModelOptions, train_text2image
from cyclediffusion.training.modules import DiffusionModule, OptimConfig
from cyclediffusion.training.repa import FrozenEncoder, RepresentationAlignment, aligned_layer

from helpers import squares, tiny_denoiser, tiny_text_encoder, tiny_tokenizer, tiny_vae


def module(repa: bool, **kw) -> DiffusionModule:
    torch.manual_seed(0)
    tokenizer, vae = tiny_tokenizer(max_length=20), tiny_vae()
    parts = (tokenizer, tiny_text_encoder(tokenizer), tiny_denoiser("unet", 4, 4), create_noise_process("flow"), vae)
    encoder = FrozenEncoder("vae", vae=vae) if repa else None
    return DiffusionModule(*parts, OptimConfig(), repa_encoder=encoder, **kw)


def batch(step: int = 0) -> dict:
    return {"pixels": squares(8), "caption": ["a red square"] * 8, "step": torch.full((8,), step)}


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_projector_learns_to_match_the_encoder_features(backbone):
    torch.manual_seed(0)
    denoiser = tiny_denoiser(backbone, 4, 4)
    target = torch.randn(2, 48, 8, 8)  # pooled to the layer's own grid
    repa = RepresentationAlignment(denoiser, target_dim=48)
    x, context = torch.randn(2, 4, 4, 4), torch.randn(2, 5, 32)
    params = [*repa.parameters(), *denoiser.parameters()]
    assert all(p is not q for p in repa.parameters() for q in denoiser.parameters())  # the layer is not a submodule
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(60):
        with repa.capture():
            denoiser(x, torch.tensor([500.0, 500.0]), context, context[:, 0])
        loss = repa.loss(target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert 0.7 < losses[0] < 1.3 and losses[-1] < 0.5 * losses[0]
    with pytest.raises(RuntimeError, match="nothing captured"):
        repa.loss(target)


def test_step_aligns_until_its_share_of_the_run_and_never_trains_the_encoder():
    plain, aligned = module(False), module(True, repa_weight=0.5, repa_until=0.5)
    off = plain.step_losses(batch())
    on = aligned.step_losses(batch())
    assert off.repa is None and 0 < on.repa.item() < 2
    torch.testing.assert_close(on.denoise.loss, off.denoise.loss)  # the hook leaves the prediction alone
    torch.testing.assert_close(on.loss, off.loss + 0.5 * on.repa)
    on.loss.backward()
    encoder = aligned.shared.value["repa_encoder"].network
    assert all(p.grad is None for p in encoder.parameters())
    assert aligned.repa.projector[0].weight.grad.abs().sum() > 0
    assert aligned.denoiser.conv_in.weight.grad.abs().sum() > 0  # below the aligned layer too
    aligned.progress = 0.5
    later = aligned.step_losses(batch())
    assert later.repa is None
    torch.testing.assert_close(later.loss, later.denoise.loss.mean())
    # an EMA copy aligns its own denoiser's layer and shares the frozen encoder
    twin = copy.deepcopy(aligned)
    assert (
        twin.repa.layer is twin.denoiser.mid
        and twin.shared.value["repa_encoder"] is aligned.shared.value["repa_encoder"]
    )
    assert not any(k.startswith("repa.layer") for k in aligned.state_dict())


def test_captioner_encoder_and_bad_choices():
    tokenizer = tiny_tokenizer(max_length=20)
    captioner = CaptionPipeline(tokenizer, tiny_captioner(tokenizer)).eval()
    encoder = FrozenEncoder("captioner", captioner=captioner)
    features = encoder(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert features.shape == (2, encoder.dim, 4, 4) and not features.requires_grad
    assert aligned_layer(tiny_denoiser("dit", 4, 4))[1] == 64
    with pytest.raises(ValueError, match="needs a latent model"):
        FrozenEncoder("vae")
    with pytest.raises(ValueError, match="needs a VAE trained here"):
        FrozenEncoder("vae", vae=torch.nn.Identity())
    with pytest.raises(ValueError, match="needs --captioner"):
        ModelOptions(repa_weight=0.5, repa_encoder="captioner")
    with pytest.raises(ValueError, match="repa-until"):
        ModelOptions(repa_until=0)


def test_training_with_repa_logs_its_loss_and_exports_no_projector(tmp_path):
    data = DataOptions(data=str(write_folder(tmp_path / "data")), image_size=16, cache_latents=True)
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    model = ModelOptions(**{**vars(tiny_model()), "vae": str(vae_dir), "repa_weight": 0.5, "repa_until": 0.5})
    out = train_text2image(data, tiny_run(tmp_path / "run", steps=6), model)
    rows = metrics(tmp_path / "run")
    assert [("train/repa_loss" in r) for r in rows] == [True] * 3 + [False] * 3  # not repeated once it is off
    gaps = [r["train/loss"] - r["train/denoise_loss"] for r in rows]
    assert all(g > 1e-3 for g in gaps[:3]) and all(abs(g) < 1e-6 for g in gaps[3:])  # off after half the steps
    exported = {p.name for p in (out / "denoiser").iterdir()}
    assert "model.safetensors" in exported
    from safetensors.torch import load_file

    assert not any("projector" in k for k in load_file(out / "denoiser" / "model.safetensors"))
