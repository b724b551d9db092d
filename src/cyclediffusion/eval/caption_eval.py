"""Captioner scores on held-out images: exact match of the generated caption and teacher-forced token accuracy."""

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
    included, padding not) that the captioner ranks first given the reference prefix; a few examples."""

    exact_match: float
    token_accuracy: float
    count: int
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
            for reference, caption in zip(references, generated):
                exact += caption == reference
                if len(examples) < num_examples:
                    examples.append({"reference": reference, "generated": caption})
    finally:
        pipe.captioner.train(was_training)
    return CaptionScores(exact / len(dataset), correct / max(1, total), len(dataset), examples)
