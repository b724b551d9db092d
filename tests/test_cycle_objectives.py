"""What the cycle term optimises and where: weighted binding words, colour-swapped negatives, guided last-k chains,
a late start, a policy gradient (GRPO) that raises its reward, and a captioner trained to read a frozen model's
one-step estimates (always with the true caption)."""

from __future__ import annotations

import pytest
import torch
from test_captioner import tiny_captioner
from test_cycle import build, captioner_pipeline, make_batch
from test_training import write_folder

from cyclediffusion.data.shapes import binding_words, negative_caption, parse_caption
from cyclediffusion.eval.caption_eval import evaluate_captioner_on_samples
from cyclediffusion.pipelines.caption import CaptionPipeline, token_weights
from cyclediffusion.training import CaptionerOptions, CycleConfig, DataOptions, RunOptions, train_captioner
from cyclediffusion.training.modules import CaptionerModule, OptimConfig

from helpers import CAPTIONS, tiny_pipeline, tiny_tokenizer

SHAPES_CAPTIONS = ["a red circle and a blue square", "a green triangle above a red square", "a blue circle"]


def test_negative_captions_are_false_of_the_same_picture():
    assert negative_caption("a red circle and a blue square") == "a blue circle and a red square"
    assert negative_caption("a green triangle above a red square") == "a red triangle above a green square"
    single = parse_caption(negative_caption("a small blue circle on the left"))
    assert single.colours != ("blue",) and (single.shapes, single.size, single.position) == (
        ("circle",),
        "small",
        "left",
    )
    assert negative_caption("two red squares") == "two green squares"
    assert negative_caption("a photo of a cat") is None
    assert negative_caption("a green triangle above a red square", "relation") == "a green triangle below a red square"
    flipped = negative_caption("a red circle to the left of a blue square", "relation")
    assert flipped == "a red circle to the right of a blue square"
    assert negative_caption(flipped, "relation") == "a red circle to the left of a blue square"
    assert negative_caption("a red circle and a blue square", "relation") is None  # no relation to flip
    with pytest.raises(ValueError, match="swap"):
        negative_caption("a blue circle", "size")
    assert {"red", "circles", "above", "left", "three"} <= binding_words() and "a" not in binding_words()


def test_word_weights_weigh_the_binding_tokens():
    tokenizer = tiny_tokenizer(max_length=20)
    ids = tokenizer(["a red square", "two yellow circles"]).input_ids
    weights = token_weights(tokenizer.decode, ids, binding_words(), 3.0)
    words = [[tokenizer.decode([i]).strip() for i in row] for row in ids.tolist()]
    for row, w in zip(words, weights.tolist()):
        for word, value in zip(row, w):
            assert value == (3.0 if word in binding_words() else 1.0), (word, value)
    assert (weights == 3.0).sum(1).min() >= 1  # every caption has a binding word spelt by one token

    pipe = CaptionPipeline(tokenizer, tiny_captioner(tokenizer)).eval()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    plain = pipe.loss(pixels, ["a red square"] * 2, reduction="none")
    torch.testing.assert_close(pipe.loss(pixels, ["a red square"] * 2, "none", (binding_words(), 1.0)), plain)
    assert not torch.allclose(pipe.loss(pixels, ["a red square"] * 2, "none", (binding_words(), 5.0)), plain)


@pytest.mark.parametrize("objective", ["weighted", "contrastive", "contrastive+relation"])
def test_objectives_against_plain_cross_entropy(one_thread, objective):
    objective, _, relation = objective.partition("+")
    negatives = "colours+relation" if relation else "colours"
    module = build("unet", "flow", "pixels", fraction=1.0, objective=objective, word_weight=1.0, negatives=negatives)
    reader = captioner_pipeline(CAPTIONS + SHAPES_CAPTIONS)
    module.cycle.captioner = reader
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    texts = [*SHAPES_CAPTIONS, "a photo"]
    nll = reader.loss(pixels, texts, reduction="none")
    got = module.cycle.objective(pixels, texts)
    softplus = torch.nn.functional.softplus
    if objective == "weighted":  # weight 1 is plain cross-entropy
        torch.testing.assert_close(got, nll)
    else:
        swapped = reader.loss(pixels[:3], [negative_caption(t) for t in SHAPES_CAPTIONS], reduction="none")
        expected = nll[:3] + softplus(nll[:3] - swapped)
        if relation:  # one more margin, on the relation caption only (row 1: "above" against "below")
            flipped = reader.loss(pixels[1:2], [negative_caption(SHAPES_CAPTIONS[1], "relation")], "none")
            expected[1] += softplus(nll[1] - flipped)[0]
        torch.testing.assert_close(got[:3], expected)
        torch.testing.assert_close(got[3], nll[3])  # outside the grammar: plain cross-entropy
    with pytest.raises(ValueError, match="objective"):
        CycleConfig(objective="rl")
    with pytest.raises(ValueError, match="negatives"):
        CycleConfig(negatives="sizes")


def test_the_term_waits_for_its_start_and_last_k_can_be_guided(one_thread):
    module = build("unet", "flow", "pixels", start=0.5)
    batch = make_batch(module, "pixels", 2)
    assert module.step_losses(batch).cycle is None
    module.progress = 0.5
    assert module.step_losses(batch).cycle is not None
    with pytest.raises(ValueError, match="start"):
        CycleConfig(start=1.0)

    plain = build("unet", "flow", "pixels", mode="last-k", k=1, sample_steps=2, fraction=1.0)
    guided = build("unet", "flow", "pixels", mode="last-k", k=1, sample_steps=2, fraction=1.0, guidance=3.0)
    x0 = plain.clean_latents(batch, plain.step_generator(0))
    a = plain.cycle.loss(plain, x0, batch["caption"], plain.step_generator(0, 1))
    b = guided.cycle.loss(guided, x0, batch["caption"], guided.step_generator(0, 1))
    assert not torch.allclose(a, b)
    b.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in guided.denoiser.parameters())


def estimates_module(fraction: float) -> CaptionerModule:
    tokenizer = tiny_tokenizer(max_length=20)
    model = tiny_pipeline("unet", "flow", vae=True)
    return CaptionerModule(tokenizer, tiny_captioner(tokenizer), OptimConfig(), estimates=model,
                           estimate_fraction=fraction)  # fmt: skip


def test_captioner_reads_one_step_estimates_with_the_true_captions(one_thread):
    module = estimates_module(0.5)
    pixels = torch.rand(16, 3, 16, 16) * 2 - 1
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(16)]
    mixed = module.with_estimates(pixels, captions, step=3)
    replaced = (mixed - pixels).flatten(1).abs().amax(1) > 1e-6
    assert 3 <= int(replaced.sum()) <= 13  # about half the rows ...
    torch.testing.assert_close(module.with_estimates(pixels, captions, step=3), mixed)  # ... keyed to the step
    assert not torch.equal(module.with_estimates(pixels, captions, step=4), mixed)
    assert mixed.min() >= -1 and mixed.max() <= 1
    everything = estimates_module(1.0).with_estimates(pixels, captions, step=3)
    assert ((everything - pixels).flatten(1).abs().amax(1) > 1e-6).all()
    assert all(not p.requires_grad for m in module.shared.value["estimates"].modules for p in m.parameters())
    with pytest.raises(ValueError, match="estimate-fraction"):
        CaptionerOptions(estimate_fraction=0)


def test_train_captioner_on_estimates_and_score_it_on_the_models_samples(tmp_path, one_thread):
    data = write_folder(tmp_path / "data", n=16, size=16)
    model = tiny_pipeline("unet", "flow", vae=True)
    model.save_pretrained(tmp_path / "t2i")
    run = RunOptions(out=str(tmp_path / "cap"), steps=3, batch_size=4, warmup=1, progress=False, ema_decay=None)
    options = CaptionerOptions(size="tiny", read_estimates_of=str(tmp_path / "t2i"), estimate_fraction=0.5)
    out = train_captioner(DataOptions(data=str(data), image_size=16), run, options)
    reader = CaptionPipeline.from_pretrained(out)
    scores = evaluate_captioner_on_samples(reader, model, ["a red square", "a blue square"], 2)
    assert scores.count == 2 and scores.shapes_correct is not None and 0 <= scores.shapes_correct <= 1
    with pytest.raises(ValueError, match="read-estimates-of makes"):
        train_captioner(DataOptions(data=str(data), image_size=32), run, options)


@pytest.mark.parametrize("process", ["ddpm", "flow"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_raises_the_reward_it_is_given(one_thread, process, sign):
    """With the captioner's score replaced by the drawings' brightness, the policy gradient alone (no denoising
    loss) moves what the model draws from the same noise the way the reward asks, and its value is that score."""
    module = build("unet", process, "pixels", mode="grpo", fraction=1.0, group=8, k=2, sample_steps=4)
    module.cycle.objective = lambda pixels, texts: sign * pixels.flatten(1).mean(1)  # caption loss = -reward
    batch = make_batch(module, "pixels", 16)  # two captions, drawn 8 times each
    x0 = module.clean_latents(batch, module.step_generator(0))
    params = [*module.denoiser.parameters(), *module.text_encoder.parameters()]
    optimiser = torch.optim.Adam(params, lr=1e-3)
    values = []
    for _ in range(12):
        optimiser.zero_grad()
        value = module.cycle.loss(module, x0, batch["caption"], module.step_generator(0, 1))
        value.backward()
        optimiser.step()
        values.append(float(value.detach()))
    # the caption loss (minus the reward) falls
    assert values[-1] < values[0] - 0.05, " ".join(f"{v:.3f}" for v in values)


def test_grpo_advantages_are_centred_within_groups(one_thread):
    """Equal rewards in a group give no gradient: the policy only learns from differences between drawings."""
    module = build("dit", "flow", "pixels", mode="grpo", fraction=1.0, group=3, k=1, sample_steps=3)
    module.cycle.objective = lambda pixels, texts: pixels.new_tensor([len(t) for t in texts])  # one value per caption
    batch = make_batch(module, "pixels", 2)
    x0 = module.clean_latents(batch, module.step_generator(0))
    value = module.cycle.loss(module, x0, batch["caption"], module.step_generator(0, 1))
    value.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in module.denoiser.parameters())
