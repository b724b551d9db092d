"""A tiny U-Net and a tiny DiT learn two captions by heart, and guided DDIM draws the right one.

A plain training loop (no Lightning) over the library core: text encoder and denoiser trained
jointly in pixel space, caption dropped 10% of the time so that guidance has an unconditional branch.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_pipeline, two_caption_world


def train(pipe, images, captions, steps: int, lr: float, seed: int = 0) -> tuple[float, float]:
    """Train in place; return the loss on a fixed evaluation batch before and after."""
    torch.manual_seed(seed)
    process, denoiser, encoder = pipe.noise_process, pipe.denoiser, pipe.text_encoder
    ids = pipe.tokenizer(captions).input_ids
    empty = pipe.tokenizer([""]).input_ids

    def loss_on(x0, ids, noise=None, t=None, generator=None):
        text = encoder(ids)

        def model_fn(x, s):
            return denoiser(x, s, text.hidden_states, text.pooled)

        return process.training_loss(model_fn, x0, noise=noise, t=t, generator=generator).loss.mean()

    g = torch.Generator().manual_seed(123)
    eval_noise = torch.randn(images.shape, generator=g)
    eval_t = (
        torch.linspace(50, 950, len(images)).long()
        if hasattr(process, "alphas_cumprod")
        else torch.linspace(0.05, 0.95, len(images))
    )

    def evaluate() -> float:
        with torch.no_grad():
            return float(loss_on(images, ids, eval_noise, eval_t))

    before = evaluate()
    params = list(denoiser.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    denoiser.train(), encoder.train()
    for _ in range(steps):
        drop = torch.rand(len(captions)) < 0.1
        batch_ids = torch.where(drop[:, None], empty.expand_as(ids), ids)
        loss = loss_on(images, batch_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    denoiser.eval(), encoder.eval()
    return before, evaluate()


@pytest.mark.parametrize(
    "backbone,prediction,steps,lr",
    # Epsilon prediction is checked against diffusers elsewhere; on 8 tiny pixel images it learns the
    # text condition much more slowly than x0 or v targets (its x0 estimate is poor at high noise).
    [("unet", "x0", 300, 2e-3), ("dit", "v_prediction", 400, 1e-3)],
)
def test_overfit_two_captions(backbone, prediction, steps, lr):
    images, captions = two_caption_world()
    pipe = tiny_pipeline(backbone, "ddpm", prediction_type=prediction, beta_schedule="cosine")
    before, after = train(pipe, images, captions, steps, lr)
    assert after <= 0.5 * before, f"loss {before:.4f} -> {after:.4f}"

    reds, blues = images[:4], images[4:]
    for prompt, own, other in (("a red square", reds, blues), ("a blue circle", blues, reds)):
        out = (
            pipe(
                prompt,
                num_inference_steps=20,
                guidance_scale=3.0,
                num_images_per_prompt=4,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images
            * 2
            - 1
        )
        assert out.shape == (4, 3, 16, 16)
        # Mean colour per sample must be nearer the caption's images than the other caption's.
        d_own = ((out.mean((2, 3)) - own.mean((0, 2, 3))) ** 2).sum(1)
        d_other = ((out.mean((2, 3)) - other.mean((0, 2, 3))) ** 2).sum(1)
        assert torch.all(d_own < d_other), f"{prompt}: own {d_own.tolist()} vs other {d_other.tolist()}"
        mse_own = min(((out - im) ** 2).mean() for im in own)
        mse_other = min(((out - im) ** 2).mean() for im in other)
        assert mse_own < mse_other
