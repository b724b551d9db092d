"""EMA decays compared on one training trajectory: several moving averages kept along one run, each scored.

Trains the demo's text-to-image recipe (``composition_ablation``'s ``dit_mask``) on a finished demo's data and VAE
and keeps, beside the run's own EMA (``--ema-decay``, 0.999 with the warm-up ``min(d, (1 + n) / (10 + n))``), one
more average per ``--decays`` entry with the same warm-up, and the raw weights of the last step. At the end each is
loaded into the exported pipeline and scored by ShapesEval with the same sampling seed, so the comparison is paired:
one trajectory, no seed or machine-speed noise between the rows. Decays whose warm-up is still below them at the
last step give the run's own EMA exactly.

    python benchmarks/ema_tracks.py --demo runs/demo --minutes 6.8 --seeds 0,1 --decays 0.98,0.99
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from common import machine_line, training_device, versions_line
from composition_ablation import demo_holdout, quick_demo, variant_model
from safetensors.torch import load_file, save_file

from cyclediffusion.demo import IMAGE_SIZE
from cyclediffusion.eval import build_suite, evaluate_pipeline
from cyclediffusion.pipelines import Text2ImagePipeline
from cyclediffusion.training import DataOptions, RunOptions, train_text2image
from cyclediffusion.training.callbacks import ema_decay_at

PARTS = ("text_encoder", "denoiser")


class Tracks(L.Callback):
    """Moving averages of the text encoder and denoiser at ``decays`` (the EMA callback's update and warm-up), and
    the raw weights after each step; written to ``RUN/track_{name}.safetensors`` when training ends."""

    def __init__(self, run: Path, decays: list[float]) -> None:
        self.run, self.decays, self.updates = run, decays, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = pl_module.state_dict()
        self.names = [k for k, v in state.items() if k.startswith(PARTS) and v.is_floating_point()]
        self.tracks = {str(d): [state[k].detach().clone() for k in self.names] for d in self.decays}
        self.tracks["raw"] = [state[k].detach().clone() for k in self.names]
        self.current = [state[k].detach() for k in self.names]  # views of the live tensors, updated in place

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        for decay in self.decays:
            torch._foreach_lerp_(self.tracks[str(decay)], self.current, 1 - ema_decay_at(decay, self.updates))
        torch._foreach_copy_(self.tracks["raw"], self.current)  # before the EMA is copied into the module at the end
        self.updates += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, tensors in self.tracks.items():
            save_file({k: t.contiguous() for k, t in zip(self.names, tensors)}, str(self.path(name)))

    def path(self, name: str) -> Path:
        return self.run / f"track_{name}.safetensors"


def load_track(pipe: Text2ImagePipeline, path: Path) -> None:
    """Every floating-point tensor of the text encoder and denoiser from a track file (strict on those names)."""
    weights = load_file(str(path))
    for part in PARTS:
        module = getattr(pipe, part)
        mine = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith(part + ".")}
        floats = {k for k, v in module.state_dict().items() if v.is_floating_point()}
        if set(mine) != floats:
            raise ValueError(f"{path} does not match the pipeline's {part}: {sorted(set(mine) ^ floats)[:3]}")
        module.load_state_dict(mine, strict=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo run: its data/ and vae/ are reused")
    parser.add_argument("--out", default="runs/ema_tracks")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training (and sampling) seeds")
    parser.add_argument("--minutes", type=float, default=6.8, help="training budget (the demo's, about 6.8)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="the run's own EMA (exported)")
    parser.add_argument("--decays", default="0.98,0.99", help="comma-separated decays kept beside it")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a tiny world and a few steps (for the tests)")
    args = parser.parse_args(argv)
    out, decays = Path(args.out), [float(d) for d in args.decays.split(",")]
    if any(not 0 < d < 1 for d in decays):
        parser.error("--decays must lie in (0, 1)")
    demo = quick_demo(out / "demo") if args.quick else Path(args.demo)
    device, precision = training_device()
    suite = build_suite(per_kind=2 if args.quick else 20, held_out=demo_holdout(demo))
    results: dict[str, dict] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = out / f"s{seed}"
        tracks = Tracks(run, decays)
        length = {"steps": 3} if args.quick else {"minutes": args.minutes, "steps": 100_000}
        options = RunOptions(
            out=str(run), **length, batch_size=16 if args.quick else 64, warmup=100, precision=precision, seed=seed,
            ema_decay=args.ema_decay, checkpoint_every=10**9, resume=False, progress=False,
        )  # fmt: skip
        data = DataOptions(data=str(demo / "data"), image_size=IMAGE_SIZE, cache_latents=True)
        model_dir = train_text2image(data, options, variant_model("dit_mask", demo, args.quick), callbacks=[tracks])
        row: dict = {"steps": tracks.updates}
        for name in [f"ema {args.ema_decay:g}", "raw", *map(str, decays)]:
            pipe = Text2ImagePipeline.from_pretrained(model_dir, device=device)
            if not name.startswith("ema "):
                load_track(pipe, tracks.path(name))
            report = evaluate_pipeline(
                pipe, suite, 1 if args.quick else args.samples_per_prompt, num_inference_steps=25, seed=seed,
                progress=False,
            )  # fmt: skip
            row[name] = {"overall": report.overall, **report.accuracy}
        results[str(seed)] = row
        out.mkdir(parents=True, exist_ok=True)
        (out / "ema_tracks.json").write_text(json.dumps(results, indent=1) + "\n")
    print(machine_line(device) + f", training precision {precision}")
    print(versions_line())
    names = [k for k in next(iter(results.values())) if k != "steps"]
    categories = list(results[next(iter(results))][names[0]])
    print("| seed | steps | weights | " + " | ".join(categories) + " |")
    print("| --- | ---: | --- |" + " ---: |" * len(categories))
    for seed, row in results.items():
        for name in names:
            cells = " | ".join(f"{row[name][c]:.3f}" for c in categories)
            print(f"| {seed} | {row['steps']} | {name} | {cells} |")
    return results


if __name__ == "__main__":
    main()
