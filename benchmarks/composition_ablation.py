"""Composition ablation: which text conditioning, position signal and caption mix make the demo's model bind
colours to objects, count and place things, at equal training time.

    python benchmarks/composition_ablation.py --demo runs/demo --minutes 5 --seeds 0,1            # the screen
    python benchmarks/composition_ablation.py --demo runs/demo --minutes 10 --seeds 0,1,2 --variants base,text
    python benchmarks/composition_ablation.py --demo runs/demo --minutes 60 --seeds 0 --variants dit_mask \
        --snapshots 10,30                                        # a scaling curve: 10, 30 and 60 minutes, one run
    python benchmarks/composition_ablation.py --quick                                            # seconds, tiny

Every run is ``cyclediffusion train`` with the recipe the screens started from (``base``: flow matching,
logit-normal times, "small" U-Net, batch 64, lr 1e-3, EMA 0.999) or a variant of it (``dit_mask`` is today's demo
recipe: a tiny DiT whose cross-attention ignores padding) on the data and VAE of a finished ``cyclediffusion demo``
(``--demo``), for ``--minutes`` of training from scratch, then ShapesEval (``cyclediffusion
eval``: 20 prompts per category, ``--samples-per-prompt``, 25 steps, the model's guidance, sampling seed = the
training seed). A variant changes model options, or the caption world (a new dataset of the same size from the same
renderer, encoded by the same VAE). The table gives each category's mean ± std over the seeds and the paired
difference to ``base``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import lightning as L
from common import machine_line, training_device, versions_line
from lightning.pytorch.callbacks import Timer

from cyclediffusion.data.shapes import world_holdout, write_imagefolder
from cyclediffusion.demo import BACKBONE, DEMO_WORLD, IMAGE_SIZE, MASK_PADDING, MODEL_SIZE, demo_model
from cyclediffusion.eval import CATEGORIES, build_suite, evaluate_pipeline
from cyclediffusion.pipelines import Text2ImagePipeline
from cyclediffusion.training import (
    CycleConfig,
    DataOptions,
    ModelOptions,
    RunOptions,
    VAEOptions,
    train_text2image,
    train_vae,
)
from cyclediffusion.training.callbacks import export_atomically, inference_module
from cyclediffusion.training.train import save_pipeline

NO_CYCLE = CycleConfig(weight=0.0)  # the captioner as REPA's encoder only
DIT = {"backbone": BACKBONE, "model_size": MODEL_SIZE}
CAPTIONS = {"kinds": {"single": 0.4, "count": 0.2, "pair": 0.2, "relation": 0.2}, "p_position": 0.8}  # the demo's now
PAIRS = {"kinds": {"single": 0.3, "count": 0.2, "pair": 0.3, "relation": 0.2}, "p_position": 0.8}
COUNTS = {"kinds": {"single": 0.3, "count": 0.3, "pair": 0.2, "relation": 0.2}, "p_position": 0.8}
SINGLE70 = {"kinds": {"single": 0.7, "count": 0.1, "pair": 0.1, "relation": 0.1}, "p_position": 0.5}  # until 12-05
# name -> (model option overrides, caption-world overrides, run option overrides)
VARIANTS: dict[str, tuple[dict, dict, dict]] = {
    "base": ({}, {}, {}),
    "mask": ({"mask_padding": True}, {}, {}),
    "text": ({"mask_padding": True, "text_refiner_layers": 1}, {}, {}),
    "mix": ({"mask_padding": True, "text_refiner_layers": 1, "text_layer_mix": True}, {}, {}),
    "coord": ({"coord_channels": True}, {}, {}),
    "positions": ({"attention_positions": True}, {}, {}),
    "dit": (DIT, {}, {}),
    "dit_mask": ({**DIT, "mask_padding": MASK_PADDING}, {}, {}),  # the demo's recipe
    "dit_caps": ({**DIT, "mask_padding": True}, CAPTIONS, {}),
    "dit_single70": ({**DIT, "mask_padding": True}, SINGLE70, {}),
    "dit_pairs": ({**DIT, "mask_padding": True}, PAIRS, {}),
    "dit_count4": ({**DIT, "mask_padding": True}, {"max_count": 4}, {}),
    "dit_b32": ({**DIT, "mask_padding": True}, {}, {"batch_size": 32}),
    "dit_b128": ({**DIT, "mask_padding": True}, {}, {"batch_size": 128}),
    "dit_wsd": ({**DIT, "mask_padding": True}, {}, {"lr_schedule": "wsd"}),
    "dit_refiner": ({**DIT, "mask_padding": True, "text_refiner_layers": 1}, {}, {}),
    "dit_wide": ({**DIT, "mask_padding": True, "dit_hidden_size": 192}, {}, {}),
    "dit_deep": ({**DIT, "mask_padding": True, "dit_depth": 6}, {}, {}),
    "dit_lr2": ({**DIT, "mask_padding": True}, {}, {"lr": 2e-3}),
    "dit_muon": ({**DIT, "mask_padding": True}, {}, {"optimizer": "muon"}),
    "dit_muon2": ({**DIT, "mask_padding": True}, {}, {"optimizer": "muon", "lr": 2e-3}),
    "dit_muon3": ({**DIT, "mask_padding": True}, {}, {"optimizer": "muon", "lr": 3e-3}),
    "dit_muon2_noisy": ({**DIT, "mask_padding": True, "logit_mean": 0.5}, {}, {"optimizer": "muon", "lr": 2e-3}),
    "dit_muon2_clean": ({**DIT, "mask_padding": True, "logit_mean": -0.5}, {}, {"optimizer": "muon", "lr": 2e-3}),
    "dit_muon2_counts": ({**DIT, "mask_padding": True}, COUNTS, {"optimizer": "muon", "lr": 2e-3}),
    "dit_muon_wsd": ({**DIT, "mask_padding": True}, {}, {"optimizer": "muon", "lr_schedule": "wsd"}),
    "dit_muon_ddpm": ({**DIT, "mask_padding": True, "scheduler": "ddpm"}, {}, {"optimizer": "muon"}),  # v, cosine
    "dit_muon_p2": ({**DIT, "mask_padding": True, "model_size": "mini/2"}, {}, {"optimizer": "muon"}),  # 16 tokens
    "dit_nopool": ({**DIT, "mask_padding": True, "pooled_text": False}, {}, {}),
    "dit_pixel": ({**DIT, "mask_padding": True, "vae": None, "dit_patch_size": 4}, {}, {}),  # no VAE, 4x4 patches
    "dit_pixel_noisy": ({**DIT, "mask_padding": True, "vae": None, "dit_patch_size": 4, "logit_mean": 1.0}, {}, {}),
    "dit_p2": ({**DIT, "mask_padding": True, "dit_hidden_size": 256, "dit_patch_size": 2}, {}, {}),  # 16 tokens, wider
    "dit_p2_192": ({**DIT, "mask_padding": True, "model_size": "mini/2"}, {}, {}),  # width 192, 2x2 patches
    "dit_joint": ({**DIT, "mask_padding": True, "dit_joint_text": True}, {}, {}),  # MM-DiT blocks
    "dit_sc": ({**DIT, "mask_padding": True, "self_condition": 0.5}, {}, {}),  # self-conditioning, half the steps
    "dit_guide": ({**DIT, "mask_padding": True}, {}, {"export_guide": 0.5}),  # the model carries RUN/guide: eval guided
    "dit_mask_imm": ({**DIT, "mask_padding": True, "immiscible_noise": True}, {}, {}),
    "attn8": ({"model_size": "medium"}, {}, {}),
    "captions": ({}, CAPTIONS, {}),
    "paraphrase": ({}, {**CAPTIONS, "p_size": 0.8, "p_paraphrase": 0.5}, {}),
    "fast": ({}, {}, {"lr": 2e-3, "lr_schedule": "cosine"}),
    "cosine": ({}, {}, {"lr_schedule": "cosine"}),
    "immiscible": ({"immiscible_noise": True}, {}, {}),
    "imm_coord": ({"immiscible_noise": True, "coord_channels": True}, {}, {}),
    "imm_positions": ({"immiscible_noise": True, "attention_positions": True}, {}, {}),
    "imm_noisy05": ({"immiscible_noise": True, "logit_mean": 0.5}, {}, {}),
    "imm_noisy10": ({"immiscible_noise": True, "logit_mean": 1.0}, {}, {}),
    "repa": ({"repa_weight": 0.5, "repa_encoder": "vae", "repa_until": 0.5}, {}, {}),
    "repa_cap": ({"repa_weight": 0.5, "repa_encoder": "captioner", "repa_until": 0.5, "cycle": NO_CYCLE}, {}, {}),
    "all": ({"mask_padding": True, "text_refiner_layers": 1, "coord_channels": True}, CAPTIONS, {}),
}


class Snapshots(L.Callback):
    """Exports the inference model (EMA weights) to ``RUN/model_at_{m}min`` once ``m`` minutes of training have
    passed, for each ``m`` in ``minutes``, by Lightning's own training clock (the one ``--minutes`` stops a run
    by): with a constant learning rate a snapshot at ``m`` minutes is the model an ``m``-minute run ends with, so
    one long run gives the whole scaling curve."""

    def __init__(self, run: Path, minutes: list[float]) -> None:
        self.run, self.pending = run, sorted(minutes)
        self.start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def elapsed(self, trainer: L.Trainer) -> float:
        for cb in trainer.callbacks:
            if isinstance(cb, Timer):
                return cb.time_elapsed()
        return time.perf_counter() - self.start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        while self.pending and self.elapsed(trainer) >= 60 * self.pending[0]:
            folder = self.folder(self.pending.pop(0))
            export_atomically(save_pipeline, inference_module(trainer, pl_module), folder)
            (folder / "step.txt").write_text(f"{trainer.global_step}\n")

    def folder(self, minutes: float) -> Path:
        return self.run / f"model_at_{minutes:g}min"


def world_data(demo: Path, root: Path, name: str, world: dict, n: int) -> Path:
    """The caption world of a variant, written once under ``root`` (the demo's own data when unchanged)."""
    if not world:
        return demo / "data"
    folder = root / f"data_{name}"
    if not (folder / "metadata.jsonl").is_file():
        write_imagefolder(folder, n, dataclasses.replace(DEMO_WORLD, **world), seed=0, num_workers=2, overwrite=True)
    return folder


def variant_model(name: str, demo: Path, quick: bool = False, captioner: str | None = None) -> ModelOptions:
    """The model options of variant ``name`` on the demo's VAE: the screens' ``base`` (the U-Net, every composition
    option off) with the variant's changes; ``quick`` shrinks it for the tests."""
    changes = VARIANTS[name][0]
    if changes.get("repa_encoder") == "captioner":
        changes = {**changes, "captioner": captioner}
    base = dataclasses.replace(demo_model(demo / "vae", "unet"), immiscible_noise=False, mask_padding=False)
    model = dataclasses.replace(base, **changes)
    return dataclasses.replace(model, model_size="tiny", text_width=32, text_layers=1) if quick else model


def demo_holdout(demo: Path) -> tuple[str, ...]:
    """The colour-shape pairs the demo's data never draws (its ``world.json``): ShapesEval's held-out category."""
    return world_holdout(demo / "data") or ()


def quick_demo(folder: Path) -> Path:
    """``--quick``: a tiny stand-in for a demo folder (400 images, a VAE trained for a few steps)."""
    shutil.rmtree(folder, ignore_errors=True)
    data = write_imagefolder(folder / "data", 400, DEMO_WORLD, seed=0)
    run = RunOptions(out=str(folder / "vae"), steps=3, batch_size=16, warmup=1, ema_decay=None, progress=False)
    train_vae(DataOptions(data=str(data), image_size=IMAGE_SIZE), run, VAEOptions(size="tiny", downsample=4))
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo run: its data/ and vae/ are reused")
    parser.add_argument("--out", default="runs/composition_ablation", help="runs, data variants and the JSON")
    parser.add_argument("--variants", default="base,text,coord,captions", help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training (and sampling) seeds")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of every run")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--per-kind", type=int, default=20, help="prompts per ShapesEval category")
    parser.add_argument("--quick", action="store_true", help="a tiny world and a few steps (for the tests)")
    parser.add_argument("--captioner", help="a trained captioner (train-captioner run) for repa_cap")
    parser.add_argument("--pause-file", help="before each run, wait while this file exists (frees the CPU for a while)")
    parser.add_argument("--merge", action="store_true", help="keep the other runs of an earlier JSON in --out")
    parser.add_argument("--reference", default="base", help="the variant the paired differences are taken to")
    parser.add_argument(
        "--snapshots", type=minutes_list, default=[], help="minutes (e.g. 10,30): also evaluate the model each run "
        "had by then"
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    snapshot_minutes = args.snapshots
    demo = quick_demo(out / "demo") if args.quick else Path(args.demo)
    n = sum(1 for _ in (demo / "data" / "metadata.jsonl").open())
    device, precision = training_device()
    suite = build_suite(per_kind=2 if args.quick else args.per_kind, held_out=demo_holdout(demo))
    length = {"steps": 2} if args.quick else {"minutes": args.minutes, "steps": 100_000}
    saved = out / "composition_ablation.json"
    results: dict[str, list[dict]] = json.loads(saved.read_text()) if args.merge and saved.is_file() else {}
    for name in names:  # the runs made now replace those of the same variant and seed
        results[name] = [r for r in results.get(name, []) if r["seed"] not in seeds]
    caches: dict[Path, Path] = {}  # data folder -> a run whose latent cache (same VAE) can be copied
    for name in names:
        model_options, world, run_options = VARIANTS[name]
        data = world_data(demo, out, name, world, n)
        for seed in seeds:
            while args.pause_file and Path(args.pause_file).exists():
                time.sleep(5)
            run = out / f"{name}_s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            for file in ("latents.safetensors", "latents.json") if data in caches else ():
                shutil.copy(caches[data] / file, run / file)  # checked against the VAE and data, re-encoded if stale
            if model_options.get("repa_encoder") == "captioner" and not args.captioner:
                parser.error(f"variant {name} needs --captioner")
            model = variant_model(name, demo, args.quick, args.captioner)
            options = RunOptions(
                out=str(run), **length, warmup=100, precision=precision, seed=seed, checkpoint_every=10**9,
                resume=False, progress=False, **{"batch_size": 16 if args.quick else 64, **run_options},
            )  # fmt: skip
            data_options = DataOptions(data=str(data), image_size=IMAGE_SIZE, cache_latents=True)
            snapshots = Snapshots(run, snapshot_minutes)
            model_dir = train_text2image(data_options, options, model, callbacks=[snapshots])
            if (run / "latents.safetensors").is_file():  # pixel-space runs cache nothing
                caches.setdefault(data, run)
            steps = json.loads((run / "logs" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
            evaluated = [(name, model_dir, steps)] + [
                (f"{name}@{m:g}min", snapshots.folder(m), int((snapshots.folder(m) / "step.txt").read_text()))
                for m in snapshot_minutes
                if snapshots.folder(m).is_dir()
            ]
            for key, folder, at_step in evaluated:
                t0 = time.perf_counter()
                pipe = Text2ImagePipeline.from_pretrained(folder, device=device)
                report = evaluate_pipeline(
                    pipe, suite, samples_per_prompt=1 if args.quick else args.samples_per_prompt,
                    num_inference_steps=25, seed=seed, progress=False,
                )  # fmt: skip
                scores = {"overall": report.overall, **report.accuracy}
                row = {"seed": seed, "steps": at_step, "eval_seconds": time.perf_counter() - t0, **scores}
                results[key] = sorted([r for r in results.get(key, []) if r["seed"] != seed] + [row], key=seed_of)
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(results, indent=2) + "\n")  # after every run: a crash loses one run
    print(machine_line(device) + f", training precision {precision}")
    print(versions_line())
    print(f"{args.minutes:g} min of training per run, seeds {args.seeds}, {args.samples_per_prompt} samples/prompt\n")
    print(table(results, [c for c in CATEGORIES if c in results[names[0]][0]], args.reference))
    return results


def minutes_list(text: str) -> list[float]:
    """``--snapshots``: comma-separated minutes, none negative."""
    try:
        minutes = [float(m) for m in text.split(",") if m]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes such as 10,30, got {text!r}") from None
    if any(m < 0 for m in minutes):
        raise argparse.ArgumentTypeError(f"minutes cannot be negative, got {text!r}")
    return minutes


def seed_of(row: dict) -> int:
    return row["seed"]


def table(results: dict[str, list[dict]], categories: list[str], reference: str = "base") -> str:
    """Mean ± std per category, and the paired difference to ``reference`` (same seeds) where it was run."""
    columns = ["steps", "overall", *categories]

    def cell(rows: list[dict], key: str, base: list[dict] | None) -> str:
        values = [r[key] for r in rows]
        text = f"{statistics.mean(values):.0f}" if key == "steps" else f"{statistics.mean(values):.3f}"
        if len(values) > 1 and key != "steps":
            text += f" ± {statistics.stdev(values):.3f}"
        if base is not None and key != "steps":
            by_seed = {r["seed"]: r[key] for r in base}
            diffs = [r[key] - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]
            text += f" ({statistics.mean(diffs):+.3f})" if diffs else ""
        return text

    lines = ["| variant | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, rows in results.items():
        base = results.get(reference) if name != reference else None
        lines.append(f"| {name} | " + " | ".join(cell(rows, c, base) for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
