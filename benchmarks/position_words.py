"""Does a model read the words that say where an object is? The loss gap when a caption's place is swapped.

For single objects rendered at the left, right, top and bottom anchors, the model's denoising loss at high noise
(where the layout is decided) with the true caption is compared with the loss under a swapped caption:

- ``mirror``: the other side of the same axis ("on the left" -> "on the right", "at the top" -> "at the bottom");
- ``axis``: the other axis ("on the left" -> "at the top": preposition and word change);
- ``word``: the other axis's word after the same preposition ("on the left" -> "on the top");
- ``preposition``: the other axis's preposition before the same word ("on the left" -> "at the left").

A gap near 0 means the model draws the same thing whatever the swapped words say. A model that learnt "on ... means
the horizontal axis" but not which side has a large ``axis`` gap and no ``mirror`` gap: it draws the object on
either side. Two modes:

    python benchmarks/position_words.py --model runs/demo/t2i                     # one trained model
    python benchmarks/position_words.py --demo runs/demo --variant dit_mask --steps 1200 --every 200 --seed 0

The second trains a variant of ``composition_ablation.py`` on the demo's data and VAE and prints the gaps at noise
0.9 every ``--every`` steps (the live weights, not the EMA): when, if ever, the model learns the axis and the side.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import machine_line, training_device, versions_line
from composition_ablation import VARIANTS, variant_model, world_data

from cyclediffusion import Text2ImagePipeline
from cyclediffusion.data.shapes import POSITION_PHRASES, Prompt, Scene, ShapesConfig, caption_for, layout, render
from cyclediffusion.demo import IMAGE_SIZE
from cyclediffusion.images import images_to_tensor
from cyclediffusion.training import DataOptions, RunOptions, train_text2image

PLACES = ("left", "right", "top", "bottom")
MIRROR = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
OTHER_AXIS = {"left": "top", "right": "bottom", "top": "left", "bottom": "right"}
SWAPS = ("mirror", "axis", "word", "preposition")
LEVELS = (0.7, 0.9, 0.99)
COLOURS = ("red", "green", "blue", "yellow", "white")
SHAPES = ("circle", "square", "triangle")


def probe_captions(n: int = 80, seed: int = 0) -> tuple[list, dict[str, list[str]]]:
    """``n`` renders of single objects at the four side anchors, their captions and each swap's captions."""
    rng, world = np.random.default_rng(seed), ShapesConfig(size=IMAGE_SIZE, texture=0.0)
    images, texts = [], {k: [] for k in ("true", *SWAPS)}
    for i in range(n):
        place, colour, shape = PLACES[i % 4], COLOURS[(i // 4) % 5], SHAPES[(i // 20) % 3]
        prompt = Prompt("single", (colour,), (shape,), position=place)
        images.append(render(Scene(layout(rng, prompt, world), caption_for(prompt), "single", prompt), IMAGE_SIZE))
        head = f"a {colour} {shape} "
        own, other = POSITION_PHRASES[place].split()[0], POSITION_PHRASES[OTHER_AXIS[place]].split()[0]
        texts["true"].append(caption_for(prompt))
        texts["mirror"].append(head + POSITION_PHRASES[MIRROR[place]])
        texts["axis"].append(head + POSITION_PHRASES[OTHER_AXIS[place]])
        texts["word"].append(f"{head}{own} the {OTHER_AXIS[place]}")
        texts["preposition"].append(f"{head}{other} the {place}")
    return images, texts


def path_time(process, level: float) -> torch.Tensor:
    """The process's time at noise ``level`` in (0, 1): t itself for flow, a timestep index for Gaussian."""
    steps = getattr(process, "num_train_timesteps", None) or getattr(process.config, "num_train_timesteps", None)
    return torch.tensor(level) if steps is None else torch.tensor(round(level * (steps - 1)))


@torch.no_grad()
def word_gaps(pipe: Text2ImagePipeline, levels=LEVELS, draws: int = 3, seed: int = 1) -> dict[float, dict[str, float]]:
    """Per noise level: the loss with the true caption and each swap's loss minus it (same noise draws)."""
    images, texts = probe_captions()
    x0 = pipe.pixels_to_latents(images_to_tensor(images).to(pipe.device)).float()
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x0.shape, generator=g).to(pipe.device) for _ in range(draws)]
    embeds = {name: pipe.encode_prompt(captions) for name, captions in texts.items()}
    process, out = pipe.noise_process, {}
    for level in levels:
        t = path_time(process, level).expand(len(images)).to(pipe.device)
        losses = {}
        for name, e in embeds.items():

            def model_fn(x: torch.Tensor, s: torch.Tensor, e=e) -> torch.Tensor:
                return pipe.denoiser(x, s, e.context, e.pooled, e.mask)

            per_draw = [process.training_loss(model_fn, x0, noise=n, t=t).loss.mean() for n in noises]
            losses[name] = float(torch.stack(per_draw).mean())
        out[level] = {"loss": losses["true"], **{k: losses[k] - losses["true"] for k in SWAPS}}
    return out


class Probe(L.Callback):
    """Prints and records :func:`word_gaps` at noise 0.9 of the live weights every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every, self.rows, self.start = every, [], time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.measure(trainer.global_step, module)

    def on_train_end(self, trainer, module) -> None:
        self.measure(trainer.global_step, module)

    def measure(self, step: int, module) -> None:
        if self.rows and self.rows[-1]["step"] == step:
            return
        pipe = module.to_pipeline()
        was = [m.training for m in pipe.modules]
        pipe.eval()
        gaps = word_gaps(pipe, levels=(0.9,))[0.9]
        for m, mode in zip(pipe.modules, was):
            m.train(mode)
        self.rows.append({"step": step, "seconds": time.perf_counter() - self.start, **gaps})
        print(row_line(self.rows[-1]), flush=True)


def row_line(row: dict) -> str:
    gaps = " ".join(f"{k} {row[k]:+.4f}" for k in SWAPS)
    return f"step {row['step']:5d} ({row['seconds']:5.0f} s): loss {row['loss']:.4f}  {gaps}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained text-to-image model (run or model folder)")
    parser.add_argument("--demo", default="runs/demo", help="train mode: a finished demo (its data and VAE)")
    parser.add_argument("--variant", choices=list(VARIANTS), help="train mode: the composition variant to train")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/position_words", help="train mode: runs and the JSON")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.variant):
        parser.error("give --model (one model) or --variant (train and probe)")
    device, precision = training_device()
    print(machine_line(device) + f", training precision {precision}")
    print(versions_line())
    if args.model:
        gaps = word_gaps(Text2ImagePipeline.from_pretrained(args.model, device=device))
        for level, row in gaps.items():
            print(f"noise {level:.2f}: loss {row['loss']:.4f}  " + " ".join(f"{k} {row[k]:+.4f}" for k in SWAPS))
        return {str(k): v for k, v in gaps.items()}
    demo, run = Path(args.demo), Path(args.out) / f"{args.variant}_s{args.seed}"
    probe = Probe(args.every)
    options = RunOptions(
        out=str(run), steps=args.steps, batch_size=64, warmup=100, precision=precision, seed=args.seed,
        checkpoint_every=10**9, resume=False, progress=False, **VARIANTS[args.variant][2],
    )  # fmt: skip
    n = sum(1 for _ in (demo / "data" / "metadata.jsonl").open())
    folder = world_data(demo, Path(args.out), args.variant, VARIANTS[args.variant][1], n)
    data = DataOptions(data=str(folder), image_size=IMAGE_SIZE, cache_latents=True)
    train_text2image(data, options, variant_model(args.variant, demo), callbacks=[probe])
    result = {"variant": args.variant, "seed": args.seed, "precision": precision, "rows": probe.rows}
    (run / "position_words.json").write_text(json.dumps(result, indent=2, default=lambda v: math.nan) + "\n")
    return result


if __name__ == "__main__":
    main()
