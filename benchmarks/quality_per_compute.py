"""Quality per unit of compute: the ShapesEval score the demo's recipe reaches after 2, 5 and 10 minutes of training.

    python benchmarks/quality_per_compute.py                       # 20000 images, one VAE, three runs (~20 min)
    python benchmarks/quality_per_compute.py --vae runs/demo/vae   # reuse a trained VAE (same data and world)
    python benchmarks/quality_per_compute.py --quick               # a few hundred images, seconds of training

The recipe is ``run_demo``'s (``cyclediffusion demo``): 32 px shapes, a 4x "tiny" VAE, then the text encoder
and a "small" U-Net trained jointly on cached latents (cosine schedule, v-prediction, batch 64, lr 1e-3, EMA
0.999, bf16 on a GPU). The data is written once and the VAE trained once; each budget is then a separate
text-to-image run from scratch, whose ``minutes`` bound Lightning's fit (data loading and latent caching not
counted). Each exported model is scored like the demo's: ShapesEval, 2 samples per prompt, 25 DDIM steps,
guidance 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

from common import machine_line, training_device, versions_line

from cyclediffusion.data.shapes import ensure_imagefolder
from cyclediffusion.demo import BACKBONE, DEMO_WORLD, IMAGE_SIZE, demo_model
from cyclediffusion.eval import CATEGORIES, build_suite, evaluate_pipeline
from cyclediffusion.pipelines import Text2ImagePipeline
from cyclediffusion.pipelines.storage import resolve_model_dir
from cyclediffusion.recipes import DEFAULT_GUIDANCE
from cyclediffusion.training import DataOptions, RunOptions, VAEOptions, train_text2image, train_vae
from cyclediffusion.training.callbacks import read_metrics


def quiet() -> None:
    """Keep Lightning's start-up chatter out of the table."""
    import lightning  # noqa: F401  (it sets its loggers when imported)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "cyclediffusion"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(treespec|does not have many workers|GPU available but not).*")


def make_data(folder: Path, n: int, seed: int) -> Path:
    """The demo's shapes world, written once (kept when ``world.json`` says it is the same)."""
    ensure_imagefolder(folder, n, DEMO_WORLD, seed=seed, num_workers=2)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quality_per_compute", help="data, VAE, runs and the JSON")
    parser.add_argument("--quick", action="store_true", help="tiny data and budgets, a reduced suite")
    parser.add_argument("--minutes", default="2,5,10", help="comma-separated training budgets")
    parser.add_argument("--n", type=int, default=20000, help="training images")
    parser.add_argument("--vae", default=None, help="a trained VAE to reuse (default: train one)")
    parser.add_argument("--vae-minutes", type=float, default=2.2, help="VAE budget (the demo's share of 10 min)")
    parser.add_argument("--backbone", choices=["unet", "dit"], default=BACKBONE)
    parser.add_argument("--model-size", default=None, help="default: the demo's size of the backbone")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--per-kind", type=int, default=20, help="prompts per category of the suite")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.n, args.vae_minutes, args.model_size = "0.03,0.06", 256, 0.03, "tiny"
        args.samples_per_prompt, args.per_kind, args.sample_steps = 1, 2, 5
    budgets = [float(m) for m in args.minutes.split(",")]
    quiet()
    device, precision = training_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    data = make_data(out / "data", args.n, args.seed)
    data_minutes = (time.perf_counter() - t0) / 60
    if args.vae:
        vae_dir, vae_note = resolve_model_dir(args.vae, "config.json"), f"reused {args.vae}"
    else:
        shutil.rmtree(out / "vae", ignore_errors=True)
        t0 = time.perf_counter()
        vae_dir = train_vae(
            DataOptions(data=str(data), image_size=IMAGE_SIZE),
            RunOptions(
                out=str(out / "vae"), minutes=args.vae_minutes, steps=3000, batch_size=32, lr=2e-3, warmup=50,
                precision=precision, seed=args.seed, ema_decay=None, checkpoint_every=200, progress=False,
            ),
            VAEOptions(size="tiny", downsample=4),
        )  # fmt: skip
        steps = read_metrics(out / "vae" / "logs" / "metrics.jsonl")[-1]["step"]
        vae_note = f"trained {int(steps)} steps in {(time.perf_counter() - t0) / 60:.1f} min"

    suite = build_suite(per_kind=args.per_kind, held_out=())
    results, cache = [], None
    for minutes in budgets:
        run = out / f"t2i_{minutes:g}min"
        shutil.rmtree(run, ignore_errors=True)
        if cache is not None:  # same VAE, data and options: skip re-encoding the latents
            run.mkdir(parents=True)
            for path in cache:
                shutil.copy(path, run / path.name)
        model = demo_model(vae_dir, args.backbone, args.model_size)
        model_dir = train_text2image(
            DataOptions(data=str(data), image_size=IMAGE_SIZE, cache_latents=True),
            RunOptions(
                out=str(run), minutes=minutes, steps=100_000, batch_size=64, lr=1e-3, warmup=100, precision=precision,
                seed=args.seed, ema_decay=0.999, checkpoint_every=500, sample_every=0, resume=False, progress=False,
            ),
            model,
        )  # fmt: skip
        cache = [run / "latents.safetensors", run / "latents.json"]
        last = read_metrics(run / "logs" / "metrics.jsonl")[-1]
        pipe = Text2ImagePipeline.from_pretrained(model_dir, device=device)
        t0 = time.perf_counter()
        report = evaluate_pipeline(
            pipe,
            suite,
            samples_per_prompt=args.samples_per_prompt,
            num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            progress=False,
        )
        results.append(
            {
                "minutes": minutes,
                "steps": int(last["step"]),
                "train_seconds": float(last["time"]),
                "eval_seconds": time.perf_counter() - t0,
                "overall": report.overall,
                "accuracy": report.accuracy,
            }
        )

    print(machine_line(device))
    print(versions_line())
    print(
        f"data: {args.n} shapes images at {IMAGE_SIZE} px ({data_minutes:.1f} min); VAE: {vae_note}; "
        f"denoiser: {args.backbone} {args.model_size!r}, precision {precision}"
    )
    print(
        f"ShapesEval: {len({e.text for e in suite})} prompts x {args.samples_per_prompt} samples, "
        f"{args.sample_steps} steps, guidance {args.guidance:g}; score = mean of the category accuracies\n"
    )
    categories = [c for c in CATEGORIES if c in results[0]["accuracy"]]
    print("| minutes | steps | overall | " + " | ".join(categories) + " |")
    print("| ---: | ---: | ---: | " + " | ".join("---:" for _ in categories) + " |")
    for r in results:
        cells = [f"{r['minutes']:g}", str(r["steps"]), f"{r['overall']:.3f}"]
        cells += [f"{r['accuracy'][c]:.3f}" for c in categories]
        print("| " + " | ".join(cells) + " |")
    (out / "quality_per_compute.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out / 'quality_per_compute.json'}")


if __name__ == "__main__":
    main()
