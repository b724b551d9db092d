"""Unpaired translation between two models trained apart (the paper's two-model CycleDiffusion) on shapes.

    python benchmarks/translate_shapes.py --vae runs/demo/vae    # reuse the demo's VAE; two 3-minute models
    python benchmarks/translate_shapes.py                        # also train a VAE on circles + squares first
    python benchmarks/translate_shapes.py --reuse                # translate again with the models already in --out
    python benchmarks/translate_shapes.py --quick                # tiny data and models: seconds

Two worlds of single objects, one of circles only and one of squares only (every colour, size and position of
the demo's world), share one VAE (``--vae``, or one trained on their union) and one noise process (the demo's
recipe: "small" U-Net, cosine schedule, v-prediction). A text-to-image model is trained on each for ``--minutes``
from its own seed (own initial weights, own tokenizer); they never see each other's images, and no image is paired
with another.

Held-out red, green and blue circles are then translated by ``translate(image, circle_model, square_model, ...)``:
the circle model's DPM-Encoder writes each image as noises, the square model decodes them. Two ways of prompting
are compared: ``empty`` (the empty prompt on both sides: the models' unconditional branch, learnt from the 10%
dropped captions) and ``caption`` ("a red circle" for the circle model, "a red square" for the square model). SDEdit
and DDIM inversion with the same two models are the baselines. Per (prompts, method, strength), over the images:

- square: the scorer reads exactly one object, a square;  colour: ... of the source's colour;  both: the two at once;
- box IoU: of the detected object's box (the largest one) with the source object's box; 0 when nothing is found;
- centre (px): distance between the two box centres, over the images where an object was found;
- size: the detected size (small / large) is the source's.

Writes ``OUT/translate_shapes.json``, ``OUT/translate_grid.png`` (rows: sources; columns: the source, then
CycleDiffusion at each strength with ``empty`` prompts, then with ``caption`` prompts) and ``OUT/translate_methods.png``
(the source, then each method and prompting at strength 0.8).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_line, versions_line

from cyclediffusion import CycleDiffusionPipeline, translate
from cyclediffusion.data.shapes import ShapesConfig, ensure_imagefolder, render, sample_scene, scene_rng
from cyclediffusion.demo import DEMO_WORLD
from cyclediffusion.eval import detect_objects
from cyclediffusion.images import make_grid, save_image
from cyclediffusion.pipelines.edit import GENERAL_METHODS, METHODS
from cyclediffusion.pipelines.storage import resolve_model_dir
from cyclediffusion.training import DataOptions, ModelOptions, RunOptions, VAEOptions, train_text2image, train_vae

IMAGE_SIZE = 32
DOMAINS = {"circles": "circle", "squares": "square"}
EVAL_COLOURS = ("red", "green", "blue")
STRENGTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
MODES = ("empty", "caption")
GRID_STRENGTH = 0.8


def quiet() -> None:
    """Keep Lightning's start-up chatter out of the output."""
    import logging
    import warnings

    import lightning  # noqa: F401  (it sets its loggers when imported)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "cyclediffusion"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(treespec|does not have many workers|GPU available but not).*")


def world(shapes: tuple[str, ...], colours: tuple[str, ...] | None = None) -> ShapesConfig:
    """Single objects of ``shapes`` on the demo's background (every colour, size and position unless ``colours``)."""
    extra = {"colours": colours} if colours else {}
    return ShapesConfig(size=IMAGE_SIZE, kinds={"single": 1.0}, shapes=shapes, texture=DEMO_WORLD.texture, **extra)


def make_data(folder: Path, n: int, config: ShapesConfig, seed: int) -> Path:
    """Write ``n`` scenes of ``config`` once (kept when ``world.json`` says they are the same)."""
    ensure_imagefolder(folder, n, config, seed=seed, num_workers=2 if n >= 2000 else 1)
    return folder


def train_models(args, out: Path, precision: str) -> tuple[Path, dict[str, Path], dict]:
    """The shared VAE and the circle and square models (trained, or found in ``out`` with ``--reuse``)."""
    info: dict = {}
    if args.reuse:
        models = {d: resolve_model_dir(out / d) for d in DOMAINS}
        return models["circles"] / "vae", models, {"reused": str(out)}
    data = {}
    for k, (domain, shape) in enumerate(DOMAINS.items()):
        data[domain] = make_data(out / "data" / domain, args.n, world((shape,)), args.seed + k)
    if args.vae:
        vae_dir = resolve_model_dir(args.vae, "config.json")
        info["vae"] = f"reused {args.vae}"
    else:
        union = make_data(out / "data" / "union", args.n, world(tuple(DOMAINS.values())), args.seed + 10)
        shutil.rmtree(out / "vae", ignore_errors=True)
        t0 = time.perf_counter()
        vae_dir = train_vae(
            DataOptions(data=str(union), image_size=IMAGE_SIZE),
            RunOptions(
                out=str(out / "vae"), minutes=None if args.quick else args.vae_minutes, steps=2 if args.quick else 3000,
                batch_size=32, lr=2e-3, warmup=50, precision=precision, seed=args.seed, ema_decay=None,
                checkpoint_every=200, progress=False,
            ),
            VAEOptions(size="tiny", downsample=4),
        )  # fmt: skip
        info["vae"] = f"trained on circles + squares in {(time.perf_counter() - t0) / 60:.1f} min"
    models = {}
    for k, (domain, shape) in enumerate(DOMAINS.items()):
        run = out / domain
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        prompts = [f"a {c} {shape}" for c in ("red", "green", "blue", "yellow", "purple", "white")]
        models[domain] = train_text2image(
            DataOptions(data=str(data[domain]), image_size=IMAGE_SIZE, cache_latents=True),
            RunOptions(
                out=str(run), minutes=None if args.quick else args.minutes, steps=3 if args.quick else 100_000,
                batch_size=64, lr=1e-3, warmup=100, precision=precision, seed=args.seed + k, ema_decay=0.999,
                checkpoint_every=500, sample_every=0, resume=False, progress=False,
            ),
            ModelOptions(backbone="unet", model_size=args.model_size, vae=str(vae_dir), sample_prompts=prompts),
        )  # fmt: skip
        info[domain] = f"trained in {(time.perf_counter() - t0) / 60:.1f} min"
    return vae_dir, models, info


# ----------------------------------------------------------------------------- metrics
def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def measure(scene, image: np.ndarray) -> dict:
    """Shape, colour, box IoU, centre distance and size of the object read from ``image`` against the source's."""
    obj = scene.objects[0]
    source_box = (obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius)
    dets = detect_objects(image)
    one = len(dets) == 1
    record = {
        "square": one and dets[0].shape == "square",
        "colour": one and dets[0].colour == obj.colour,
        "found": [d.summary() for d in dets],
    }
    record["both"] = record["square"] and record["colour"]
    if dets:
        d = dets[0]
        box = (d.x - d.width / 2, d.y - d.height / 2, d.x + d.width / 2, d.y + d.height / 2)
        record["box_iou"] = box_iou(source_box, box)
        record["centre_px"] = math.hypot(d.x - obj.x, d.y - obj.y) * image.shape[0]
        record["size"] = d.size == obj.size
    else:
        record["box_iou"], record["centre_px"], record["size"] = 0.0, None, False
    return record


def summarise(records: list[dict]) -> dict:
    def mean(key: str) -> float | None:
        values = [float(r[key]) for r in records if r[key] is not None]
        return float(np.mean(values)) if values else None

    return {"n": len(records)} | {k: mean(k) for k in ("square", "colour", "both", "box_iou", "centre_px", "size")}


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/translate_shapes", help="data, models, JSON and grids")
    parser.add_argument("--quick", action="store_true", help="tiny data and models, 3 images, 2 strengths, 3 steps")
    parser.add_argument("--vae", default=None, help="a VAE to share (e.g. runs/demo/vae; default: train one)")
    parser.add_argument("--reuse", action="store_true", help="skip training: use the models already in --out")
    parser.add_argument("--n", type=int, default=10000, help="training images per domain")
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget of each text-to-image model")
    parser.add_argument("--vae-minutes", type=float, default=2.0)
    parser.add_argument("--model-size", default="small")
    parser.add_argument("--n-eval", type=int, default=24, help="held-out circles to translate")
    parser.add_argument("--strengths", default=",".join(f"{s:g}" for s in STRENGTHS))
    parser.add_argument("--modes", default=",".join(MODES), help="prompts: empty, caption")
    parser.add_argument("--methods", default=",".join(GENERAL_METHODS))
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance of the square model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.model_size, args.n_eval, args.strengths, args.steps = 64, "tiny", 3, "0.5,0.8", 3
    strengths = [float(s) for s in args.strengths.split(",")]
    modes, methods = args.modes.split(","), args.methods.split(",")
    if bad := [m for m in modes if m not in MODES] + [m for m in methods if m not in METHODS]:
        parser.error(f"unknown prompting or method {bad}; choose from {MODES} and {METHODS}")
    quiet()
    gpu = args.device.startswith("cuda")
    precision = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    vae_dir, model_dirs, info = train_models(args, out, precision)
    train_seconds = time.perf_counter() - t_start
    circles = CycleDiffusionPipeline.from_pretrained(model_dirs["circles"], device=args.device)
    squares = CycleDiffusionPipeline.from_pretrained(model_dirs["squares"], device=args.device)

    held_out = world(("circle",), EVAL_COLOURS)
    scenes = [sample_scene(scene_rng(args.seed + 12345, i), held_out) for i in range(args.n_eval)]
    images = [np.asarray(render(s, IMAGE_SIZE)) for s in scenes]
    colours = [s.objects[0].colour for s in scenes]
    prompts = {
        "empty": ([""] * len(scenes), [""] * len(scenes)),
        "caption": ([f"a {c} circle" for c in colours], [f"a {c} square" for c in colours]),
    }
    grid_strength = min(strengths, key=lambda s: abs(s - GRID_STRENGTH))

    t0 = time.perf_counter()
    records = [{"mode": "-", "method": "source", "strength": 0.0, "index": i} | measure(s, images[i])
               for i, s in enumerate(scenes)]  # fmt: skip
    outputs = {}
    for mode in modes:
        source_prompts, target_prompts = prompts[mode]
        for method in methods:
            for strength in strengths:
                result = translate(
                    images,
                    circles,
                    squares,
                    source_prompt=source_prompts,
                    prompt=target_prompts,
                    strength=strength,
                    eta=args.eta,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    generator=[torch.Generator().manual_seed(args.seed + i) for i in range(len(scenes))],
                    output_type="np",
                    method=method,
                ).images
                translated = np.clip(np.rint(result * 255), 0, 255).astype(np.uint8)
                outputs[mode, method, strength] = translated
                for i, scene in enumerate(scenes):
                    record = {"mode": mode, "method": method, "strength": strength, "index": i}
                    records.append(record | measure(scene, translated[i]))
    translate_seconds = time.perf_counter() - t0

    groups = [("-", "source", 0.0)] + [(m, k, s) for m in modes for k in methods for s in strengths]
    rows = []
    for mode, method, strength in groups:
        group = [r for r in records if (r["mode"], r["method"], r["strength"]) == (mode, method, strength)]
        rows.append({"mode": mode, "method": method, "strength": strength} | summarise(group))
    best = {}
    for mode in modes:
        for method in methods:
            mine = [r for r in rows if (r["mode"], r["method"]) == (mode, method)]
            top = max(mine, key=lambda r: (r["both"], r["box_iou"]))
            best[f"{mode}/{method}"] = {k: top[k] for k in ("strength", "both", "square", "colour", "box_iou")}

    print(machine_line(args.device))
    print(versions_line())
    print(
        f"models: {', '.join(f'{k} {v}' for k, v in info.items())}; VAE {vae_dir}; "
        f"training {train_seconds / 60:.1f} min"
    )
    print(
        f"translation: {len(scenes)} held-out {'/'.join(EVAL_COLOURS)} circles, {args.steps} steps, eta {args.eta:g}, "
        f"guidance {args.guidance:g}; {translate_seconds:.0f} s\n"
    )
    print("| prompts | method | strength | square | colour | square & colour | box IoU | centre (px) | size |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [r["mode"], r["method"], f"{r['strength']:g}"]
        cells += [fmt(r[k]) for k in ("square", "colour", "both", "box_iou")] + [fmt(r["centre_px"], 2), fmt(r["size"])]
        print("| " + " | ".join(cells) + " |")
    print("\nBest strength per prompting and method (most 'square & colour', then box IoU):\n")
    for key, b in best.items():
        print(
            f"- {key}: strength {b['strength']:g}: square & colour {b['both']:.2f} (square {b['square']:.2f}, "
            f"colour {b['colour']:.2f}), box IoU {b['box_iou']:.3f}"
        )

    shown = list(range(min(8, len(scenes))))
    sources = np.stack([images[i] for i in shown])
    cycle_columns = [(m, "cycle", s) for m in modes for s in strengths if (m, "cycle", s) in outputs]
    method_columns = [(m, k, grid_strength) for m in modes for k in methods]
    grids = {}
    for name, columns in (("translate_grid", cycle_columns), ("translate_methods", method_columns)):
        tiles = np.stack([sources] + [outputs[c][shown] for c in columns], axis=1).reshape(-1, *sources.shape[1:])
        tensor = torch.from_numpy(tiles).permute(0, 3, 1, 2) / 255.0
        path = save_image(make_grid(tensor, nrow=len(columns) + 1), out / f"{name}.png", scale=4)
        grids[name] = {"png": str(path), "columns": ["source"] + [f"{m}/{k} @ {s:g}" for m, k, s in columns]}
    result = {
        "models": {k: str(v) for k, v in model_dirs.items()} | {"vae": str(vae_dir)},
        "training": info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "device")},
        "train_seconds": train_seconds,
        "translate_seconds": translate_seconds,
        "rows": rows,
        "best": best,
        "grids": grids | {"rows": [s.caption for s in scenes[: len(shown)]]},
        "records": [r | {"source": scenes[r["index"]].caption} for r in records],
    }
    (out / "translate_shapes.json").write_text(json.dumps(result, indent=1))
    pngs = " and ".join(g["png"] for g in grids.values())
    print(f"\nwrote {out / 'translate_shapes.json'}, {pngs}")
    return result


if __name__ == "__main__":
    main()
