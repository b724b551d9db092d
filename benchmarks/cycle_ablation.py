"""Does the cycle-consistency loss help? Fine-tune one exported model with and without it and compare ShapesEval.

    python benchmarks/cycle_ablation.py                             # 3 weights x 3 seeds x 1.5 min (~25 min on CPU)
    python benchmarks/cycle_ablation.py --steps 300                 # the same steps for every run instead of minutes
    python benchmarks/cycle_ablation.py --weights 0,1 --cycle-t-max 100 --cycle-fraction 0.5
    python benchmarks/cycle_ablation.py --quick                     # its own tiny world, seconds of training

The protocol is the one people will use: every run starts from the same exported text-to-image pipeline
(``--init-from``, a model or run folder: the demo's by default), trains on the same data (``--data``, with cached
latents) for the same budget (``--minutes``, Lightning's fit only, or ``--steps``) with the same seeds, and
differs only in the cycle weight W of ``--weights`` (W = 0 is the plain fine-tune baseline; W > 0 adds the frozen
captioner's loss of :class:`~cyclediffusion.training.CycleConfig`, ``--captioner``, on one-step ``x0_hat``).
The recipe is otherwise the demo's (batch 64, EMA 0.999, bf16 on a GPU) with a fine-tuning learning rate (5e-4,
20 warmup steps). Run W, seed s writes into ``OUT/w{W}_s{s}`` (its ShapesEval report in ``shapes_eval.json``)
and is scored like the demo (2 samples per prompt, 25 DDIM steps, guidance 2, sampling seed s); the starting
model is scored once (row "start", seed = the first seed; ``OUT/start_shapes_eval.json``). Each configuration
reports the mean and spread over seeds of the overall score and of every category, the steps reached, the final
denoising and cycle losses (means of the last 5 logged steps of ``logs/metrics.jsonl``) and the overall score's
difference from W = 0 paired by seed (same data order, same sampling noise); ``OUT/cycle_ablation.json`` holds it all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

from common import machine_line, training_device, versions_line
from quality_per_compute import quiet

from cyclediffusion.data.shapes import ShapesConfig, write_imagefolder
from cyclediffusion.demo import demo_prompts
from cyclediffusion.eval import CATEGORIES, build_suite, evaluate_pipeline
from cyclediffusion.options import add_flags, given_flags
from cyclediffusion.pipelines import CaptionPipeline, Text2ImagePipeline
from cyclediffusion.pipelines.storage import resolve_model_dir
from cyclediffusion.recipes import DEFAULT_GUIDANCE
from cyclediffusion.training import (
    CaptionerOptions,
    CycleConfig,
    DataOptions,
    ModelOptions,
    RunOptions,
    train_captioner,
    train_text2image,
    train_vae,
)
from cyclediffusion.training.callbacks import read_metrics
from cyclediffusion.training.optimizers import OPTIMIZERS
from cyclediffusion.training.options import VAEOptions

ROOT = Path(__file__).resolve().parents[1]
CACHE_FILES = ("latents.safetensors", "latents.json")
FINAL_ROWS = 5  # the final losses are means over this many of the last logged steps (single steps are noisy)


def tiny_world(folder: Path, seed: int) -> tuple[Path, Path, Path]:
    """``--quick``: 320 shapes at 16 px, a tiny VAE, a tiny starting model and a tiny captioner (a few steps each).

    Returns (data, starting run, captioner run)."""
    shutil.rmtree(folder, ignore_errors=True)
    data = write_imagefolder(folder / "data", 320, ShapesConfig(size=16), seed=seed)
    options = DataOptions(data=str(data), image_size=16, cache_latents=True)

    def run(name: str, steps: int, **kw) -> RunOptions:
        defaults = dict(batch_size=16, lr=1e-3, warmup=2, seed=seed, log_every=1, progress=False, resume=False)
        return RunOptions(out=str(folder / name), steps=steps, **(defaults | kw))

    vae = train_vae(options, run("vae", 3, ema_decay=None), VAEOptions(size="tiny", downsample=4))
    model = ModelOptions(model_size="tiny", text_width=32, text_layers=1, vocab_size=300, vae=str(vae))
    train_text2image(options, run("start", 6), model)
    captioner = CaptionerOptions(size="tiny", tokenizer=str(folder / "start"))
    train_captioner(options, run("captioner", 4, ema_decay=None), captioner)
    return data, folder / "start", folder / "captioner"


def spread(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std (0 for one value), min and max of the values that are not None."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return {"mean": statistics.fmean(kept), "std": std, "min": min(kept), "max": max(kept), "n": len(kept)}


def final(rows: list[dict], key: str) -> float | None:
    """The mean of ``key`` over its last :data:`FINAL_ROWS` logged steps (None when never logged)."""
    values = [row[key] for row in rows if key in row][-FINAL_ROWS:]
    return statistics.fmean(values) if values else None


def scores(pipe: Text2ImagePipeline, suite, args: argparse.Namespace, seed: int, path: Path | None) -> dict:
    """ShapesEval of ``pipe``: overall, accuracy per category (None where empty), seconds; report to ``path``."""
    t0 = time.perf_counter()
    report = evaluate_pipeline(
        pipe,
        suite,
        samples_per_prompt=args.samples_per_prompt,
        num_inference_steps=args.sample_steps,
        guidance_scale=args.guidance,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    full = report.to_json()
    if path is not None:
        path.write_text(json.dumps(full) + "\n")
    accuracy = {c: full["categories"][c]["accuracy"] for c in CATEGORIES}
    return {"overall": full["overall"], "accuracy": accuracy, "eval_seconds": seconds}


def run_key(args: argparse.Namespace, weight: float, seed: int, cycle: CycleConfig | None) -> dict:
    """What makes two runs the same run: a finished run with this key is read back instead of trained again."""
    fields = ("init_from", "data", "minutes", "steps", "batch_size", "lr", "optimizer", "warmup", "ema_decay")
    fields += ("samples_per_prompt", "per_kind", "sample_steps", "guidance")
    key = {f: getattr(args, f) for f in fields} | {"weight": weight, "seed": seed}
    if cycle is not None:
        key |= {"captioner": args.captioner, "cycle": dataclasses.asdict(cycle)}
    return key


def cell(stats: dict, digits: int = 3) -> str:
    """``mean±std`` (just the mean for one value; ``-`` for none)."""
    if stats["mean"] is None:
        return "-"
    mean = f"{stats['mean']:.{digits}f}"
    return mean if stats["n"] < 2 else f"{mean}±{stats['std']:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cycle_ablation", help="the runs and cycle_ablation.json")
    parser.add_argument("--quick", action="store_true", help="a tiny world of its own, a few steps, a reduced suite")
    parser.add_argument("--init-from", default=str(ROOT / "runs/demo/t2i"), help="the starting pipeline (run folder)")
    parser.add_argument("--data", default=str(ROOT / "runs/demo/data"), help="captioned images (imagefolder)")
    parser.add_argument("--captioner", default=str(ROOT / "runs/captioner"), help="caption pipeline of the cycle loss")
    parser.add_argument("--weights", default="0,0.1,1", help="comma-separated cycle weights (0: plain fine-tune)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (training and sampling)")
    parser.add_argument("--minutes", type=float, default=1.5, help="training budget of every run")
    parser.add_argument("--steps", type=int, default=None, help="train every run this many steps instead")
    parser.add_argument("--variant", default=None, help="name of the cycle runs' folders (default: mode_objective)")
    add_flags(parser, CycleConfig, "cycle term (its weight comes from --weights)", prefix="cycle")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--optimizer", default="adamw", choices=OPTIMIZERS, help="of every fine-tune (muon: the demo's)"
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--per-kind", type=int, default=20, help="prompts per category of the suite")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    args = parser.parse_args(argv)
    cycle_options = given_flags(args).get("cycle", {})
    if "weight" in cycle_options:
        parser.error("give the cycle weights with --weights, not --cycle-weight")
    if args.quick:
        args.weights, args.seeds, args.steps, args.batch_size, args.warmup = "0,0.5", "0", 3, 16, 1
        args.samples_per_prompt, args.per_kind, args.sample_steps = 1, 2, 3
    weights = [float(w) for w in args.weights.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    quiet()
    device, precision = training_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if args.quick:
        data, init_from, captioner = tiny_world(out / "world", seeds[0])
        args.data, args.init_from, args.captioner = str(data), str(init_from), str(captioner)
    world_seconds = time.perf_counter() - t0
    start_dir = resolve_model_dir(args.init_from)
    start = Text2ImagePipeline.from_pretrained(start_dir, device=device)
    image_size = start.denoiser.sample_size * start.latent_factor
    if any(weights):  # a missing or mismatched captioner fails now, not after the baseline's runs
        captioner_size = CaptionPipeline.from_pretrained(args.captioner).image_size
        if captioner_size != image_size:
            raise ValueError(f"the captioner reads {captioner_size}px images, the model makes {image_size}px")
    suite = build_suite(per_kind=args.per_kind)
    start_scores = scores(start, suite, args, seeds[0], out / "start_shapes_eval.json")
    del start

    data = DataOptions(data=args.data, image_size=image_size, cache_latents=True)
    length = {"steps": args.steps} if args.steps else {"steps": 100_000, "minutes": args.minutes}
    cache = [Path(args.init_from)]  # the starting run's latents serve when its data options were the same
    configs = []
    settings_of = CycleConfig(weight=1.0, **cycle_options)  # a bad setting fails before any run
    variant = args.variant or f"{settings_of.mode}_{settings_of.objective}"
    for weight in weights:
        cycle = CycleConfig(weight=weight, **cycle_options) if weight else None
        name = f"{variant}_w{weight:g}" if weight else "w0"
        runs = []
        for seed in seeds:
            run = out / f"{name}_s{seed}"
            key = run_key(args, weight, seed, cycle)
            done = run / "result.json"
            recorded = json.loads(done.read_text()) if done.is_file() and not args.quick else {}
            if recorded.get("key") == key:
                runs.append(recorded["run"])  # the same run, already trained and scored
                print(f"{run}: reused")
                continue
            shutil.rmtree(run, ignore_errors=True)  # metrics.jsonl is append-only: start afresh
            run.mkdir(parents=True)
            source = next((d for d in cache if all((d / f).is_file() for f in CACHE_FILES)), None)
            for file in CACHE_FILES if source else ():  # checked against the VAE and data, re-encoded if stale
                shutil.copy(source / file, run / file)
            model = ModelOptions(
                init_from=args.init_from,
                captioner=args.captioner if weight else None,
                cycle=cycle or CycleConfig(weight=0.0),
                sample_prompts=demo_prompts(),
            )
            options = RunOptions(
                out=str(run), **length, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                warmup=args.warmup, precision=precision, seed=seed, ema_decay=args.ema_decay or None,
                log_every=1 if args.quick else 10, checkpoint_every=10**9, sample_every=0, resume=False, progress=False,
            )  # fmt: skip
            model_dir = train_text2image(data, options, model)
            cache.insert(0, run)
            rows = read_metrics(run / "logs" / "metrics.jsonl")
            losses = {
                "denoise_loss": final(rows, "train/denoise_loss" if weight else "train/loss"),
                "cycle_loss": final(rows, "train/cycle_loss"),
            }
            pipe = Text2ImagePipeline.from_pretrained(model_dir, device=device)
            result = scores(pipe, suite, args, seed, run / "shapes_eval.json")
            steps, seconds = int(rows[-1]["step"]), float(rows[-1]["time"])
            record = {"seed": seed, "steps": steps, "train_seconds": seconds, **losses, **result}
            done.write_text(json.dumps({"key": key, "run": record}) + "\n")
            runs.append(record)
        for record in runs:
            record["seconds_per_step"] = record["train_seconds"] / max(record["steps"], 1)
        keys = ("overall", "steps", "seconds_per_step", "denoise_loss", "cycle_loss")
        summary = {key: spread([r[key] for r in runs]) for key in keys}
        summary["accuracy"] = {c: spread([r["accuracy"][c] for r in runs]) for c in CATEGORIES}
        settings = None if cycle is None else dataclasses.asdict(cycle)
        configs.append({"name": name, "weight": weight, "cycle": settings, "runs": runs, "summary": summary})
    baseline = next((c for c in configs if c["weight"] == 0), None)
    for config in configs:  # paired by seed: the same data order and sampling noise on both sides
        if baseline is not None and config is not baseline:
            pairs = list(zip(config["runs"], baseline["runs"]))
            summary = config["summary"]
            summary["overall_minus_w0"] = spread([a["overall"] - b["overall"] for a, b in pairs])
            binding = "attribute_binding"
            summary["binding_minus_w0"] = spread([a["accuracy"][binding] - b["accuracy"][binding] for a, b in pairs])
            summary["step_cost_vs_w0"] = spread([a["seconds_per_step"] / b["seconds_per_step"] for a, b in pairs])

    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    settings = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(settings_of).items() if k != "weight")
    header = [
        machine_line(device),
        versions_line(),
        f"start: {start_dir} ({image_size} px); data: {args.data}; captioner: {args.captioner}",
        f"fine-tune: {budget} per run, batch {args.batch_size}, {args.optimizer} at lr {args.lr:g} "
        f"(warmup {args.warmup}), "
        f"EMA {args.ema_decay:g}, precision {precision}, cached latents; seeds {args.seeds}",
        f"cycle ({variant}): weights {args.weights}; {settings}",
        f"ShapesEval: {len({e.text for e in suite})} prompts x {args.samples_per_prompt} samples, "
        f"{args.sample_steps} steps, guidance {args.guidance:g}; mean±std over seeds; losses: mean of the last "
        f"{FINAL_ROWS} logged steps",
    ]
    if args.quick:
        header.append(f"quick: tiny world (data, VAE, starting model, captioner) built in {world_seconds:.0f} s")
    print("\n".join(header) + "\n")
    columns = ["config", "steps", "step cost vs w0", "denoise loss", "cycle loss", "overall", "Δ overall vs w0"]
    columns += ["Δ binding vs w0", *CATEGORIES]
    print("| " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns[1:]) + " |")
    cells = ["start", "0", "-", "-", "-", f"{start_scores['overall']:.3f}", "-", "-"]
    cells += ["-" if start_scores["accuracy"][c] is None else f"{start_scores['accuracy'][c]:.3f}" for c in CATEGORIES]
    print("| " + " | ".join(cells) + " |")
    for config in configs:
        s = config["summary"]
        cost, delta, binding = (s.get(k) for k in ("step_cost_vs_w0", "overall_minus_w0", "binding_minus_w0"))
        cells = [config["name"], cell(s["steps"], 0), "-" if cost is None else cell(cost, 2)]
        cells += [cell(s["denoise_loss"], 4), cell(s["cycle_loss"], 4), cell(s["overall"])]
        cells += ["-" if d is None else cell(d) for d in (delta, binding)]
        cells += [cell(s["accuracy"][c]) for c in CATEGORIES]
        print("| " + " | ".join(cells) + " |")

    result = {
        "machine": header[0],
        "versions": header[1],
        "protocol": vars(args) | {"device": device, "precision": precision, "image_size": image_size},
        "start": {"model": str(start_dir), **start_scores},
        "configs": configs,
    }
    (out / "cycle_ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out / 'cycle_ablation.json'}")


if __name__ == "__main__":
    main()
