"""The captioner: overfits a handful of shapes images, beam search, padding-blind loss, storage, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_training import run_cli
from tokenizers import Tokenizer as HFTokenizer

from cyclediffusion.config import Configurable
from cyclediffusion.data.shapes import ShapesConfig, generate, write_imagefolder
from cyclediffusion.eval.caption_eval import evaluate_captioner
from cyclediffusion.images import pil_to_tensor
from cyclediffusion.models import Captioner, CaptionerConfig, caption_loss
from cyclediffusion.pipelines.caption import CaptionPipeline
from cyclediffusion.text import Tokenizer

from helpers import CAPTIONS, tiny_pipeline, tiny_tokenizer

SIZE = 16


def tiny_captioner(tokenizer: Tokenizer, seed: int = 0, **overrides) -> Captioner:
    torch.manual_seed(seed)
    config = dict(
        image_size=SIZE,
        patch_size=4,
        stem_channels=16,
        width=64,
        encoder_layers=1,
        decoder_layers=2,
        heads=4,
        vocab_size=tokenizer.vocab_size,
        max_length=tokenizer.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Captioner(CaptionerConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def overfit(one_thread):
    """A captioner trained by heart on 8 shapes images (module-scoped: several tests read it)."""
    pairs = list(generate(8, ShapesConfig(size=SIZE), seed=0))
    pixels = torch.stack([pil_to_tensor(image) for image, _ in pairs])
    captions = [scene.caption for _, scene in pairs]
    tokenizer = Tokenizer.train(captions, vocab_size=300, max_length=24)
    captioner = tiny_captioner(tokenizer)
    ids = tokenizer(captions).input_ids
    opt = torch.optim.AdamW(captioner.parameters(), lr=2e-3)
    for _ in range(120):
        loss = captioner.loss(pixels, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return CaptionPipeline(tokenizer, captioner.eval()), pixels, captions


def test_captioner_overfits_shapes_images(overfit):
    pipe, pixels, captions = overfit
    assert len(set(captions)) == len(captions)
    assert pipe(pixels).captions == captions  # greedy
    assert pipe(pixels, num_beams=3).captions == captions
    scores = evaluate_captioner(pipe, [{"pixels": p, "caption": c} for p, c in zip(pixels, captions)], batch_size=3)
    assert scores.exact_match == 1.0 and scores.token_accuracy == 1.0 and scores.count == 8


def test_one_beam_is_greedy(one_thread):
    tokenizer = tiny_tokenizer(max_length=12)
    captioner = tiny_captioner(tokenizer, seed=1).eval()
    pixels = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    greedy = captioner.generate(pixels)
    assert greedy.shape[0] == 5 and (greedy[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(captioner.beam_search(pixels, num_beams=1), greedy)
    beams = captioner.generate(pixels, max_length=8, num_beams=4)
    assert beams.shape[0] == 5 and beams.shape[1] <= 8


def test_loss_ignores_padding(one_thread):
    short = tiny_tokenizer(max_length=20)
    long = Tokenizer(dataclasses.replace(short.config, max_length=32), HFTokenizer.from_str(short.backend.to_str()))
    captioner = tiny_captioner(long, seed=2)
    pixels = torch.rand(len(CAPTIONS), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = short(CAPTIONS).input_ids
    assert (ids == 0).any()
    logits = captioner(pixels, ids)
    loss = caption_loss(logits, ids)
    # logits predicting a padding target do not count
    padded = ids[:, 1:] == 0
    noisy = logits.clone()
    noisy[:, :-1][padded] = torch.randn(int(padded.sum()), logits.shape[-1]) * 10
    torch.testing.assert_close(caption_loss(noisy, ids), loss, rtol=0, atol=0)
    # more padding gives the same loss (causal decoder: padding never reaches earlier positions)
    long_ids = long(CAPTIONS).input_ids
    assert torch.equal(long_ids[:, :20], ids) and (long_ids[:, 20:] == 0).all()
    torch.testing.assert_close(captioner.loss(pixels, long_ids), loss, rtol=1e-5, atol=1e-6)
    per_caption = caption_loss(logits, ids, reduction="none")
    assert per_caption.shape == (len(CAPTIONS),)
    torch.testing.assert_close(per_caption.mean(), loss)


def test_loss_is_differentiable_in_the_pixels(one_thread):
    tokenizer = tiny_tokenizer()
    captioner = tiny_captioner(tokenizer).requires_grad_(False)
    pixels = torch.zeros(2, 3, SIZE, SIZE, requires_grad=True)
    captioner.loss(pixels, tokenizer(CAPTIONS[:2]).input_ids).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_save_and_load(tmp_path, overfit):
    pipe, pixels, captions = overfit
    pipe.save_pretrained(tmp_path / "cap")
    index = json.loads((tmp_path / "cap" / "model_index.json").read_text())
    assert index["captioner"] == "Captioner" and index["tokenizer"] == "Tokenizer"
    assert isinstance(Configurable.from_pretrained(tmp_path / "cap" / "captioner"), Captioner)  # registered
    again = CaptionPipeline.from_pretrained(tmp_path / "cap")
    assert again(pixels).captions == captions
    images = [image for image, _ in generate(2, ShapesConfig(size=SIZE), seed=0)]
    assert again(images).captions == captions[:2]  # PIL images go through the same preprocessing


def test_pipeline_refuses_another_tokenizer():
    tokenizer = tiny_tokenizer()
    captioner = tiny_captioner(tokenizer)
    other = Tokenizer.train(["completely different words here"] * 3, vocab_size=280, max_length=12)
    with pytest.raises(ValueError, match="not built for this tokenizer"):
        CaptionPipeline(other, captioner)


def test_cli_train_captioner_then_caption(tmp_path, monkeypatch, capsys, one_thread):
    data = write_imagefolder(tmp_path / "data", 12, ShapesConfig(size=SIZE))
    flags = ["--image-size", str(SIZE), "--captioner-size", "tiny", "--warmup", "1", "--log-every", "1"]
    common = ["--data", str(data), "--steps", "3", "--batch-size", "4", *flags]

    def cli(*args: str) -> int:
        return run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch)

    assert cli("train-captioner", "--out", "cap", *common, "--holdout", "4") == 0
    model = tmp_path / "cap" / "model"
    assert (model / "captioner" / "model.safetensors").is_file() and (model / "tokenizer" / "tokenizer.json").is_file()
    scores = json.loads((tmp_path / "cap" / "eval.json").read_text())
    assert scores["count"] == 4 and 0 <= scores["exact_match"] <= 1 and 0 <= scores["token_accuracy"] <= 1
    capsys.readouterr()
    images = [str(data / "00000.png"), str(data / "00001.png")]
    assert cli("caption", "--model", "cap", "--image", images[0]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    args = ["caption", "--model", "cap", "--image", images[0], "--image", images[1], "--beams", "2"]
    assert cli(*args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(images[0] + ": ")

    # a second captioner reads with the first one's tokenizer (shared, copied into its run)
    assert cli("train-captioner", "--out", "cap2", *common, "--tokenizer", "cap") == 0
    first = Tokenizer.from_pretrained(model / "tokenizer")
    second = Tokenizer.from_pretrained(tmp_path / "cap2" / "model" / "tokenizer")
    assert first.backend.to_str() == second.backend.to_str()


@pytest.mark.parametrize(
    "args,message",
    [
        (["caption", "--model", "nowhere", "--image", "x.png"], "does not exist"),
        (["caption", "--model", "t2i", "--image", "x.png"], "without a captioner"),
        (["caption", "--model", "cap", "--image", "x.png"], "image x.png not found"),
        (["train-captioner", "--data", "d", "--out", "r", "--steps", "1", "--tokenizer", "nowhere"], "nowhere"),
        (["train-captioner", "--data", "d", "--out", "r", "--steps", "1", "--holdout", "4"], "--holdout 4"),
    ],
)
def test_cli_captioner_errors_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    write_imagefolder(tmp_path / "d", 4, ShapesConfig(size=SIZE))
    tiny_pipeline().save_pretrained(tmp_path / "t2i")
    tokenizer = tiny_tokenizer()
    CaptionPipeline(tokenizer, tiny_captioner(tokenizer)).save_pretrained(tmp_path / "cap")
    assert run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "cyclediffusion" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_shapes_verdict_judges_whether_a_caption_is_true_of_the_image():
    from cyclediffusion.eval.caption_eval import shapes_verdict

    image, scene = next(iter(generate(1, ShapesConfig(size=32, kinds={"single": 1.0}), seed=3)))
    pixels = pil_to_tensor(image)
    obj = scene.objects[0]
    other = next(c for c in ("red", "blue") if c != obj.colour)
    assert shapes_verdict(scene.caption, f"a {obj.colour} {obj.shape}", pixels) is True  # unsaid size: still true
    assert shapes_verdict(scene.caption, f"a {other} {obj.shape}", pixels) is False
    assert shapes_verdict(scene.caption, "gibberish words", pixels) is False
    assert shapes_verdict("a photo of a cat", "a photo of a cat", pixels) is None  # not the shapes world
