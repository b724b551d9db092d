"""``cyclediffusion demo``: shapes data -> VAE -> text-to-image model -> sample grid and a report.

Everything runs under one wall-time budget (10 minutes by default on 2 CPU cores); a GPU is used
when present. The run folder holds the exported models, logs, the grid and ``report.md``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .data.shapes import ShapesConfig, ensure_imagefolder
from .images import make_grid, save_image
from .pipelines import Text2ImagePipeline
from .pipelines.text2image import GUIDE_GUIDANCE, GUIDE_SCALE
from .precision import choose_precision, uses_cuda
from .recipes import DEFAULT_GUIDANCE
from .training.options import DataOptions, ModelOptions, RunOptions, VAEOptions

if TYPE_CHECKING:
    from .training.callbacks import StopWhen

log = logging.getLogger("cyclediffusion")

GRID_COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
GRID_SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32
# The demo's world: plain background, 40% single objects (the grid's prompts), 20% each counts, pairs and relations;
# a single object's caption names its position 80% of the time. The DiT learns single objects and places within a few
# hundred steps, so the rest of the data goes to scenes of two and more: after 5 minutes of training, binding 0.34 and
# relations 0.33 against 0.08 and 0.09 with 70% single objects (README, "Composition"). 70% single was the better mix
# for the earlier, slower U-Net recipes.
DEMO_KINDS = {"single": 0.4, "count": 0.2, "pair": 0.2, "relation": 0.2}
# One colour-shape pair is never drawn in training, so that the report measures whether the model composes a colour
# and a shape it has only seen apart (ShapesEval's held-out category).
DEMO_HOLDOUT = ("purple triangle",)
DEMO_WORLD = ShapesConfig(size=IMAGE_SIZE, texture=0.0, kinds=DEMO_KINDS, p_position=0.8, holdout=DEMO_HOLDOUT)
EVAL_SAMPLES = 4  # ShapesEval samples per prompt in the report (as `cyclediffusion eval --samples-per-prompt 4`)
# Flow matching with logit-normal training times: after 5 minutes of training on the demo's data and VAE, ShapesEval
# single-object accuracy 0.81 against 0.49 for DDPM (v-prediction, cosine, uniform timesteps); shape 0.85 against 0.55.
SCHEDULER = "flow"
# A DiT whose cross-attention ignores the caption's padding. The U-Net learns that "on the left" and "on the right"
# mean the horizontal axis but not which side (zero padding is its only sense of place, and it sees the left and the
# right border alike): its samples put the object on either side, and position and relation scores stay at chance.
# The DiT's patches carry absolute positions: after 5 minutes ShapesEval position 0.75 against 0.22 (README,
# "Composition").
BACKBONE, MODEL_SIZE, MASK_PADDING = "dit", "tiny", True
# Immiscible noise (each latent paired with a nearby noise draw of its batch) is off: it lets the noisiest steps read
# the layout from the noise, so the model never learns it from the words (position 0.22 with it, 0.75 without).
IMMISCIBLE = False
# The VAE trains for VAE_MIN_SHARE of the time left, then on until a perfect denoiser on it would score VAE_STOP on
# ShapesEval renders it has never seen (checked every 100 steps), for at most VAE_SHARE. In 400 steps (2.2 minutes of
# an AVX2 core pair) the recipe reconstructs 8% to 81% of two-object scenes right depending on the seed, in 1181 steps
# 96%. Stopping as soon as the ceiling reached 0.95 (500-800 steps on an AVX512_BF16 machine) gave demos of overall
# 0.58 and 0.57 (two seeds) against 0.65 with the full 22% share: the floor keeps that on fast machines.
# Autoguidance: the text-to-image run also exports its model at GUIDE_SHARE of the run (`t2i/guide`), which the final
# model carries (`t2i/model/guide`): it samples by default with autoguidance (the pipeline's recipe: weight GUIDE_SCALE,
# 3, away from that weaker copy, classifier-free guidance GUIDE_GUIDANCE, 2, beside it), the grid and report included.
# On five 10-minute models of the demo's recipe (each guided by its own 5-minute export): overall +0.019 (+0.013 to
# +0.032 on every one), counting +0.10, binding +0.12, single -0.055, relations -0.05 against plain guidance 4
# (README, "Self-conditioning and autoguidance"); on three models of the demo's own length, even overall (+0.002),
# counting +0.04.
GUIDE_SHARE = 0.5
# Muon (orthogonalised momentum) trains the hidden layers' weight matrices of the text encoder and the DiT, AdamW the
# rest (`--optimizer muon`). At the demo's length (6.8 minutes of training, three seeds) overall 0.914 against 0.838
# with AdamW alone (+0.076 on every seed), relations 1.00 against 0.48, single 0.97 against 0.89 (README, "Muon").
# On an AVX2-only CPU (fp32, about 970 steps in those 6.8 minutes; three seeds) 0.772 against 0.567 (README, top).
OPTIMIZER = "muon"
# The learning rate follows the steps the ten minutes buy. Where training runs in bf16 (a GPU, or a CPU with
# AVX512_BF16 or AMX: 2100-2500 text-to-image steps on 2 cores) Muon at 1e-3 scores as well as at 2e-3 (overall
# 0.924 against 0.911, two seeds). In fp32 on an AVX2-only pair of cores the same minutes buy about 1000 steps, and
# 2e-3 wins on every one of three seeds: overall 0.854 against 0.811, binding 0.46 against 0.32 (README, top). A GPU
# without bf16 trains in fp32 too, but buys far more steps than a CPU does: it keeps the rate of the fast machines.
LR = {"fast": 1e-3, "cpu-fp32": 2e-3}
VAE_STOP = 0.95
VAE_MIN_SHARE = 0.22
VAE_SHARE = 0.35


def demo_lr(precision: str | None = None) -> float:
    """The demo's text-to-image learning rate on this machine: :data:`LR` for a CPU without native bf16, where
    the minutes buy about 1000 steps, or for everything faster (``precision``: the one ``auto`` chose, if known)."""
    precision = precision or choose_precision("auto")[0]
    return LR["cpu-fp32" if precision == "32" and not uses_cuda() else "fast"]


def demo_prompts() -> list[str]:
    """One prompt per colour-shape pair (the grid's rows are colours, its columns shapes)."""
    return [f"a {c} {s}" for c in GRID_COLOURS for s in GRID_SHAPES]


def demo_model(vae: str | Path, backbone: str = BACKBONE, model_size: str | None = None) -> ModelOptions:
    """The demo's text-to-image model on the VAE in ``vae`` (a ``model_size`` of the backbone; none: the demo's
    DiT size, or the U-Net's "small")."""
    return ModelOptions(
        backbone=backbone,
        model_size=model_size or (MODEL_SIZE if backbone == BACKBONE else "small"),
        scheduler=SCHEDULER,
        vae=str(vae),
        sample_prompts=demo_prompts(),
        guidance_scale=DEFAULT_GUIDANCE,
        immiscible_noise=IMMISCIBLE,
        mask_padding=MASK_PADDING,
    )


def run_demo(
    out: str | Path = "runs/demo",
    minutes: float = 10.0,
    backbone: str = BACKBONE,
    model_size: str | None = None,
    lr: float | None = None,
    seed: int = 0,
    n: int = 20000,
    samples_per_prompt: int = 2,
    max_steps: tuple[int, int] = (3000, 100_000),
) -> Path:
    """Run the whole demo inside ``minutes`` and return the path of its report.

    ``max_steps`` caps the VAE and text-to-image runs (the time budget usually ends them first); ``lr`` is the
    text-to-image model's (none: :func:`demo_lr`, the rate for this machine's speed).
    """
    from .training.train import train_text2image, train_vae

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + minutes * 60
    timings: dict[str, float] = {}
    precision = choose_precision("auto")[0]
    lr = demo_lr(precision) if lr is None else lr

    for stale in ("vae", "t2i"):  # a demo starts afresh (the data is kept)
        shutil.rmtree(out / stale, ignore_errors=True)
    t0 = time.perf_counter()
    data = out / "data"
    if ensure_imagefolder(data, n, DEMO_WORLD, seed=seed, num_workers=2):
        log.info("demo: wrote %d captioned shapes to %s", n, data)
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    remaining = (deadline - time.perf_counter()) / 60
    log.info("demo: training the VAE (%.1f to %.1f min, until it reconstructs the shapes)",
             VAE_MIN_SHARE * remaining, VAE_SHARE * remaining)  # fmt: skip
    train_vae(
        DataOptions(data=str(data), image_size=IMAGE_SIZE, num_workers=0),
        RunOptions(
            out=str(out / "vae"),
            minutes=VAE_SHARE * remaining,
            steps=max_steps[0],
            batch_size=32,
            lr=2e-3,
            warmup=50,
            precision=precision,
            seed=seed,
            ema_decay=None,
            checkpoint_every=200,
        ),
        VAEOptions(size="tiny", downsample=4),
        callbacks=[vae_stop(after_minutes=VAE_MIN_SHARE * remaining)],
    )
    ceiling = vae_ceiling(out / "vae")
    timings["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    budget = (deadline - time.perf_counter()) / 60 - 1.0  # start-up, latent caching, sampling, report
    log.info("demo: training the text-to-image %s (%.1f min)", backbone, budget)
    model = demo_model(out / "vae", backbone, model_size)
    train_text2image(
        DataOptions(data=str(data), image_size=IMAGE_SIZE, cache_latents=True),
        RunOptions(
            out=str(out / "t2i"),
            minutes=max(budget, 0.5),
            steps=max_steps[1],
            batch_size=64,
            lr=lr,
            optimizer=OPTIMIZER,
            warmup=100,
            precision=precision,
            seed=seed,
            ema_decay=0.999,
            checkpoint_every=500,
            sample_every=0,
            export_guide=GUIDE_SHARE,
        ),
        model,
    )
    timings["text-to-image"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = Text2ImagePipeline.from_pretrained(out / "t2i" / "model", device=device)  # with its guide
    grid_path = sample_grid(pipe, out / "samples.png", samples_per_prompt, seed)
    timings["sampling"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = shapes_eval(pipe, out / "t2i" / "eval", seed)
    timings["ShapesEval"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    return write_report(out, grid_path, timings, precision, ceiling, scores)


def vae_stop(every_n_steps: int = 100, after_minutes: float = 0.0) -> StopWhen:
    """Stops the VAE, after ``after_minutes`` of training, once its ShapesEval ceiling on held-out renders (other
    prompts and layouts than the eval's, one render each) reaches :data:`VAE_STOP`."""
    from .eval import build_suite, shapes_ceiling
    from .training.callbacks import StopWhen

    suite = build_suite(per_kind=8, held_out=(), seed=1)

    def score(module: torch.nn.Module) -> float:
        return shapes_ceiling(module.vae, 1, IMAGE_SIZE, seed=10_000, suite=suite).overall

    return StopWhen(score, VAE_STOP, every_n_steps, name="vae/shapes_ceiling", after_minutes=after_minutes)


def vae_ceiling(vae_dir: Path) -> dict[str, float]:
    """The trained VAE's :func:`~cyclediffusion.eval.shapes_ceiling` (one render per prompt, a few seconds), logged
    with a warning when it caps two-object scenes: then no text-to-image training on it can bind."""
    from .eval import load_vae, shapes_ceiling

    report = shapes_ceiling(load_vae(vae_dir).eval(), samples_per_prompt=1, image_size=IMAGE_SIZE)
    scores = {"overall": report.overall, **report.accuracy}
    log.info("demo: the VAE's ShapesEval ceiling: overall %.2f, binding %.2f", scores["overall"],
             scores["attribute_binding"])  # fmt: skip
    if scores["attribute_binding"] < 0.8:
        share = 100 * scores["attribute_binding"]
        log.warning("demo: the VAE reconstructs only %.0f%% of two-object scenes right; the text-to-image model "
                    "cannot bind better than that (train the VAE longer)", share)  # fmt: skip
    return scores


@torch.no_grad()
def shapes_eval(pipe: Text2ImagePipeline, folder: Path, seed: int) -> dict[str, float]:
    """ShapesEval of the trained model (:data:`EVAL_SAMPLES` per prompt, 25 steps, the model's own guidance and
    guide, the held-out pair too), saved to ``folder`` as ``cyclediffusion eval`` saves it; returns the accuracies."""
    from .eval import build_suite, evaluate_pipeline

    report = evaluate_pipeline(
        pipe, build_suite(held_out=DEMO_HOLDOUT), EVAL_SAMPLES, num_inference_steps=25, seed=seed, progress=False
    )
    report.save(folder)
    return {"overall": report.overall, **report.accuracy}


@torch.no_grad()
def sample_grid(pipe: Text2ImagePipeline, path: Path, per_prompt: int, seed: int) -> Path:
    """Draw each demo prompt ``per_prompt`` times (colours down, shapes and seeds across), with the model's own
    guidance and guide."""
    prompts = demo_prompts()
    images = pipe(
        prompts,
        num_inference_steps=25,
        num_images_per_prompt=per_prompt,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * per_prompt)],
        output_type="pt",
    ).images
    save_image(make_grid(images, nrow=len(GRID_SHAPES) * per_prompt), path, scale=4)
    return path


def write_report(
    out: Path,
    grid: Path,
    timings: dict[str, float],
    precision: str,
    ceiling: dict[str, float] | None = None,
    scores: dict[str, float] | None = None,
) -> Path:
    """A short Markdown report: timings, final losses, the VAE's latent scaling and ShapesEval ceiling, and the
    sample grid."""
    from .training.callbacks import read_metrics

    vae_config = json.loads((out / "vae" / "model" / "config.json").read_text())
    lines = [
        "# cyclediffusion demo",
        "",
        f"Device: {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
        f" ({torch.get_num_threads()} threads), precision {precision}, torch {torch.__version__}.",
        "",
        "| stage | minutes | steps | final loss |",
        "| --- | --- | --- | --- |",
    ]
    stages = [("data", None), ("vae", "vae"), ("text-to-image", "t2i"), ("sampling", None), ("ShapesEval", None)]
    for stage, folder in [(stage, folder) for stage, folder in stages if stage in timings]:
        steps, loss = "", ""
        if folder:
            rows = read_metrics(out / folder / "logs" / "metrics.jsonl")
            steps = str(rows[-1]["step"])
            loss = f"{rows[-1]['train/loss']:.4f}"
        lines.append(f"| {stage} | {timings[stage] / 60:.2f} | {steps} | {loss} |")
    lines += [
        f"| total | {timings['total'] / 60:.2f} | | |",
        "",
        f"VAE latent scaling factor {vae_config['scaling_factor']:.4f} (shift {vae_config['shift_factor']:.4f}),"
        " measured on the data.",
        "",
    ]
    if ceiling:
        lines += [
            "The VAE's ShapesEval ceiling (ground-truth renders through it: what a perfect denoiser on it would score):"
            f" overall {ceiling['overall']:.2f}, single {ceiling['single']:.2f}, counting {ceiling['counting']:.2f},"
            f" binding {ceiling['attribute_binding']:.2f}, relations {ceiling['relative_position']:.2f}.",
            "",
        ]
    if scores:
        names = [name for name in scores if name != "overall"]
        lines += [
            f"ShapesEval of the model ({EVAL_SAMPLES} samples per prompt, 25 steps, guidance {GUIDE_GUIDANCE:g} and "
            f"autoguidance {GUIDE_SCALE:g} by its export at {GUIDE_SHARE:.0%} of the run (`{out / 't2i' / 'guide'}`, "
            "which the model carries); "
            f"held out of training: {', '.join(DEMO_HOLDOUT)}; `{out / 't2i' / 'eval' / 'shapes_eval.json'}`):",
            "",
            "| " + " | ".join(names) + " | overall |",
            "|" + " ---: |" * (len(names) + 1),
            "| " + " | ".join(f"{scores[n]:.3f}" for n in names) + f" | {scores['overall']:.3f} |",
            "",
        ]
    lines += [
        "Rows: "
        + ", ".join(GRID_COLOURS)
        + "; columns: "
        + ", ".join(GRID_SHAPES)
        + " (two seeds each; "
        + ", ".join(DEMO_HOLDOUT)
        + " never seen in training).",
        "",
        f"![samples]({grid.name})",
        "",
        "Reproduce or go further:",
        "",
        "```",
        f"cyclediffusion sample --model {out / 't2i'} --prompt 'a red circle' --num-images 4 --out red.png",
        f"cyclediffusion sample --model {out / 't2i'} --guide-scale 0 --prompt 'a red circle' "
        "--out plain.png   # without autoguidance",
        f"tensorboard --logdir {out}",
        "```",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
