"""Captioner scores on held-out images: exact match of the generated caption, teacher-forced token accuracy, and,
on the shapes world, whether the generated caption is *true* of the image (judged by ShapesEval's scorer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..pipelines.caption import CaptionPipeline


@dataclass
class CaptionScores:
    """``exact_match``: share of images whose generated caption equals the reference (after the
    tokenizer's normalisation and truncation); ``token_accuracy``: share of reference tokens (eos
    included, padding not) that the captioner ranks first given the reference prefix; ``shapes_correct``: share of
    images whose generated caption ShapesEval's scorer finds true of the image (None unless every reference is a
    shapes-world caption). The shapes grammar leaves size and position unsaid at random, so one image has several
    right captions and exact match cannot reach 1 there; ``shapes_correct`` can. A few examples."""

    exact_match: float
    token_accuracy: float
    count: int
    shapes_correct: float | None = None
    examples: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate_captioner(
    pipe: CaptionPipeline,
    dataset: Sequence[dict[str, Any]],
    num_beams: int = 1,
    batch_size: int = 64,
    num_examples: int = 8,
) -> CaptionScores:
    """Score ``pipe`` on items ``{"pixels": (3, H, W) in [-1, 1], "caption": str}`` (a dataset or a list)."""
    if len(dataset) == 0:
        raise ValueError("no images to evaluate the captioner on")
    was_training = pipe.captioner.training
    pipe.eval()
    pad = pipe.tokenizer.pad_token_id
    exact, correct, total, examples = 0, 0, 0, []
    true_of_image: list[bool] | None = []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            pixels = torch.stack([item["pixels"] for item in items]).to(pipe.device)
            captions = [item["caption"] for item in items]
            ids = pipe.token_ids(captions)
            predicted = pipe.captioner(pixels, ids)[:, :-1].argmax(-1)
            targets, mask = ids[:, 1:], ids[:, 1:] != pad
            correct += int(((predicted == targets) & mask).sum())
            total += int(mask.sum())
            references = pipe.tokenizer.batch_decode(ids.cpu())
            generated = pipe(pixels, num_beams=num_beams).captions
            for reference, caption, image in zip(references, generated, pixels):
                exact += caption == reference
                if true_of_image is not None:
                    verdict = shapes_verdict(reference, caption, image)
                    true_of_image = None if verdict is None else [*true_of_image, verdict]
                if len(examples) < num_examples:
                    examples.append({"reference": reference, "generated": caption})
    finally:
        pipe.captioner.train(was_training)
    shapes = None if not true_of_image else sum(true_of_image) / len(true_of_image)
    return CaptionScores(exact / len(dataset), correct / max(1, total), len(dataset), shapes, examples)


def shapes_verdict(reference: str, caption: str, image: torch.Tensor) -> bool | None:
    """Whether ``caption`` is true of ``image`` ((3, H, W) in [-1, 1]) by ShapesEval; None if ``reference`` is not a
    shapes-world caption (then the data is not the shapes world)."""
    from ..data.shapes import parse_caption
    from .shapes_eval import detect_objects, score

    try:
        parse_caption(reference)
    except ValueError:
        return None
    try:
        prompt = parse_caption(caption)
    except ValueError:
        return False
    array = ((image.float().cpu().permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
    return bool(score(prompt, detect_objects(array))["correct"])


@torch.no_grad()
def evaluate_captioner_on_samples(
    captioner: CaptionPipeline,
    pipe: Any,
    prompts: Sequence[str],
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> CaptionScores:
    """How well ``captioner`` reads what the text-to-image ``pipe`` draws: one sample per prompt (image ``i`` seeded
    ``seed + i``), captioned, and judged by ShapesEval's scorer against the *drawn* picture (``shapes_correct``), so
    a captioner that repeats the prompt of a wrong drawing scores nothing for it. ``exact_match`` is against the
    prompt."""
    items = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        images = pipe(chunk, generator=generators, output_type="pt", **kwargs).images * 2 - 1
        if images.shape[-1] != captioner.image_size:
            size = (captioner.image_size, captioner.image_size)
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
        items += [{"pixels": image, "caption": text} for image, text in zip(images, chunk)]
    return evaluate_captioner(captioner, items, batch_size=batch_size)
