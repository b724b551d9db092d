"""Where does a model put a single object when the caption names a place?

For each position phrase (and for no phrase), samples ``--samples`` images of single-object captions, detects the
named object and prints the mean centre of what was drawn and how often its nearest anchor is the one asked for,
beside the same figures for ground-truth renders of the same captions (what a model that follows the words gives).
A model that ignores the position words puts every phrase's objects at the same mean centre.

    python benchmarks/position_probe.py --model runs/demo/t2i --samples 40
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from cyclediffusion import Text2ImagePipeline
from cyclediffusion.data.shapes import POSITION_PHRASES, parse_caption
from cyclediffusion.eval.shapes_eval import detect_objects, ground_truth, nearest_position

OBJECTS = ("red circle", "blue square", "green triangle", "yellow circle", "purple square", "white triangle")


def captions(position: str | None, n: int) -> list[str]:
    """``n`` single-object captions cycling over :data:`OBJECTS`, with the phrase of ``position``."""
    where = f" {POSITION_PHRASES[position]}" if position else ""
    return [f"a {OBJECTS[i % len(OBJECTS)]}{where}" for i in range(n)]


def placement(images: list, prompts: list[str], position: str | None) -> dict[str, float]:
    """Mean centre of the named object (largest detection when it is missing) and the share at ``position``."""
    xs, ys, hits, found = [], [], [], 0
    for image, prompt in zip(images, prompts):
        parsed = parse_caption(prompt)
        colour, shape = parsed.colours[0], parsed.shapes[0]
        dets = detect_objects(image)
        named = [d for d in dets if (d.colour, d.shape) == (colour, shape)]
        found += bool(named)
        target = named[0] if named else max(dets, key=lambda d: d.area, default=None)
        if target is None:
            continue
        xs.append(target.x)
        ys.append(target.y)
        hits.append(position is not None and nearest_position(target) == position)
    return {
        "x": float(np.mean(xs)) if xs else float("nan"),
        "y": float(np.mean(ys)) if ys else float("nan"),
        "at_anchor": float(np.mean(hits)) if hits and position else float("nan"),
        "named_found": found / len(prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an exported text-to-image folder")
    parser.add_argument("--samples", type=int, default=40, help="images per position phrase")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    pipe = Text2ImagePipeline.from_pretrained(args.model)
    rows = {}
    print(f"{'phrase':>14} | {'model x':>7} {'y':>5} {'at anchor':>9} {'found':>5} | {'truth x':>7} {'y':>5}")
    for position in (None, *POSITION_PHRASES):
        prompts = captions(position, args.samples)
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        images = pipe(
            prompts, generator=generators, num_inference_steps=args.steps, guidance_scale=args.guidance
        ).images
        model = placement(images, prompts, position)
        truth = placement(ground_truth(prompts, 0, size=images[0].width), prompts, position)
        rows[position or "none"] = {"model": model, "truth": truth}
        print(
            f"{position or '(none)':>14} | {model['x']:7.3f} {model['y']:5.3f} {model['at_anchor']:9.3f} "
            f"{model['named_found']:5.2f} | {truth['x']:7.3f} {truth['y']:5.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
