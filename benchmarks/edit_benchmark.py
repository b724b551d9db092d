"""Edit benchmark on shapes: success against preservation for CycleDiffusion, SDEdit and DDIM inversion.

    python benchmarks/edit_benchmark.py --model runs/demo/t2i     # 3 kinds x 24 images x 3 methods x 5 strengths
    python benchmarks/edit_benchmark.py --quick                   # tiny untrained pipeline, seconds

Ground truth: ``--n`` single-object scenes per edit kind, rendered by the shapes generator at the model's image size
with their exact captions ("a red circle", "a small red circle on the left"). Each is edited by changing words of its
caption: ``colour`` (the colour word only), ``shape`` (the shape word only) and ``both`` (colour and shape: only the
place and size of the object should survive). Every method edits the same images with the same prompts and the same
per-image generators (``--seed + i``), at guidance ``--guidance`` (source guidance 1), eta 0.1, ``--steps`` steps.

Per (kind, method, strength), over the images:

- success: ShapesEval reads exactly one object and it has the target's new attribute (colour, shape, or both);
- kept: ... and the attribute the edit did not touch is still there (shape for colour edits, colour for shape edits);
- IoU: of the edited image's object mask with the ideal edit's (the target object rendered exactly where the source
  object was: 1 for a perfect edit of any kind); masks are the pixels at least half way from the background grey to a
  palette colour. ``iou_source`` in the JSON is the IoU with the source object's mask (below 1 for a perfect shape
  edit: a circle covers pi/4 of its box, a triangle 1/2);
- PSNR-out: dB over the pixels outside the source, ideal and edited masks (dilated by a pixel): the background.

The first rows (``reconstruction``) are the image through the VAE and back (strength 0): the ceiling of IoU and
PSNR-out in this latent space. The summary compares methods at matched success: for each success level, the strength
whose IoU is best among those reaching it (all kinds pooled), which is how the paper's claim "at equal success,
CycleDiffusion preserves more than SDEdit" is checked. Writes ``OUT/edit_benchmark.json`` (table, summary, per-image
records) and ``OUT/edit_examples.png`` (rows: two images per kind; columns: source, then each method at strength 0.8).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import machine_line, versions_line

from cyclediffusion import CycleDiffusionPipeline, Tokenizer
from cyclediffusion.data.shapes import (
    BACKGROUND,
    COLOURS,
    DEFAULT_COLOURS,
    SHAPES,
    Prompt,
    ShapesConfig,
    caption_for,
    render,
    sample_scene,
    scene_rng,
)
from cyclediffusion.demo import DEMO_WORLD
from cyclediffusion.eval import detect_objects, score
from cyclediffusion.eval.shapes_eval import FOREGROUND
from cyclediffusion.images import make_grid, save_image
from cyclediffusion.pipelines.edit import GENERAL_METHODS, METHODS
from cyclediffusion.recipes import build_vae
from cyclediffusion.training.options import ModelOptions

KINDS = ("colour", "shape", "both")
STRENGTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
LEVELS = (0.25, 0.5, 0.75)  # success levels of the matched-success summary
GRID_STRENGTH = 0.8
PSNR_CAP = 100.0  # dB, for pixels that are exactly equal


# ----------------------------------------------------------------------------- the ground truth and its edits
def edit_target(prompt: Prompt, kind: str, rng: np.random.Generator) -> Prompt:
    """``prompt`` with its colour, shape or both changed to other values of the demo world (size and position,
    when named, are kept)."""
    colour, shape = prompt.colours[0], prompt.shapes[0]
    if kind in ("colour", "both"):
        colour = str(rng.choice([c for c in DEFAULT_COLOURS if c != colour]))
    if kind in ("shape", "both"):
        shape = str(rng.choice([s for s in SHAPES if s != shape]))
    return replace(prompt, colours=(colour,), shapes=(shape,))


def make_cases(n: int, size: int, seed: int, texture: float = 0.0) -> list[dict]:
    """``n`` single-object scenes per kind: render, scene, target prompt and the ideal edit's render (the target
    object in the source object's place, on the same background, grey noise of std ``texture``)."""
    world = ShapesConfig(size=size, kinds={"single": 1.0}, texture=texture)
    cases = []
    for k, kind in enumerate(KINDS):
        rng = np.random.default_rng([seed, 1000 + k])
        for i in range(n):
            scene = sample_scene(scene_rng(seed, k * n + i), world)
            target = edit_target(scene.prompt, kind, rng)
            edited = replace(scene.objects[0], colour=target.colours[0], shape=target.shapes[0])
            image = np.asarray(render(scene, size))
            ideal = np.asarray(render(replace(scene, objects=(edited,), prompt=target), size))
            cases.append({"kind": kind, "scene": scene, "image": image, "target": target, "ideal": ideal})
    return cases


# ----------------------------------------------------------------------------- metrics
def foreground(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the objects of (H, W, 3) uint8 ``pixels``, by ShapesEval's rule: at least half way from the
    background grey to a palette colour, along the nearest background-to-colour line (so that the mask of an
    object does not depend on its colour, as a plain distance from the grey would)."""
    v = pixels.astype(np.float64) - np.array(BACKGROUND, dtype=np.float64)
    d = np.array(list(COLOURS.values()), dtype=np.float64) - np.array(BACKGROUND, dtype=np.float64)
    t = np.clip(v @ d.T / (d * d).sum(1), 0, 1)  # (H, W, K) how far along each line
    nearest = np.linalg.norm(v[..., None, :] - t[..., None] * d, axis=-1).argmin(-1)
    return np.take_along_axis(t, nearest[..., None], -1)[..., 0] >= FOREGROUND


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Binary dilation by a (2r + 1) square."""
    p = np.pad(mask, r)
    h, w = mask.shape
    return np.logical_or.reduce([p[i : i + h, j : j + w] for i in range(2 * r + 1) for j in range(2 * r + 1)])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def psnr_outside(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, [0, 1] pixels) of ``edited`` against ``source`` where ``mask`` is False."""
    outside = ~mask
    if not outside.any():
        return float("nan")
    diff = (source.astype(np.float64) - edited.astype(np.float64))[outside] / 255.0
    mse = float((diff**2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / mse))


def measure(case: dict, edited: np.ndarray, target: Prompt | None = None) -> dict:
    """Success, kept, IoU and PSNR-out of one edited image (uint8 (H, W, 3)); ``target`` None: no edit asked."""
    source = case["image"]
    src_mask, out_mask = foreground(source), foreground(edited)
    ideal_mask = src_mask if target is None else foreground(case["ideal"])
    record = {
        "iou": iou(ideal_mask, out_mask),
        "iou_source": iou(src_mask, out_mask),
        "psnr_out": psnr_outside(source, edited, dilate(src_mask | ideal_mask | out_mask)),
    }
    if target is not None:
        result = score(target, detect_objects(edited))
        kind = case["kind"]
        changed = {"colour": ("colour",), "shape": ("shape",), "both": ("colour", "shape")}[kind]
        record["success"] = bool(result["number"] and all(result[c] for c in changed))
        untouched = {"colour": "shape", "shape": "colour"}.get(kind)
        record["kept"] = bool(result["number"] and result[untouched]) if untouched else None
    return record


def mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def summarise(records: list[dict]) -> dict:
    """Mean success, kept, IoU and PSNR-out of a group of per-image records."""
    return {
        "n": len(records),
        "success": mean(r.get("success") for r in records),
        "kept": mean(r.get("kept") for r in records),
        "iou": mean(r["iou"] for r in records),
        "iou_source": mean(r["iou_source"] for r in records),
        "psnr_out": mean(r["psnr_out"] for r in records),
    }


def matched_success(rows: list[dict], levels: tuple[float, ...]) -> dict:
    """For each method and success level: the row (strength) with the best IoU among those whose success reaches
    the level, or None when no strength does."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {}
        for level in levels:
            ok = [r for r in mine if r["success"] is not None and r["success"] >= level]
            best = max(ok, key=lambda r: r["iou"], default=None)
            out[method][f"{level:g}"] = (
                None if best is None else {k: best[k] for k in ("strength", "success", "iou", "psnr_out")}
            )
    return out


# ----------------------------------------------------------------------------- models and editing
def fresh_pipeline(size: int = 32, seed: int = 0) -> CycleDiffusionPipeline:
    """An untrained pipeline with a 'tiny' U-Net and a 4x 'tiny' VAE (for ``--quick`` without ``--model``)."""
    torch.manual_seed(seed)
    options = ModelOptions(model_size="tiny", text_width=64, text_layers=1)
    rng, world = np.random.default_rng(seed), ShapesConfig(size=size, kinds={"single": 1.0})
    captions = [sample_scene(rng, world).caption for _ in range(200)]
    tokenizer = Tokenizer.train(captions, vocab_size=300, max_length=16)
    vae = build_vae("tiny", 4)
    return CycleDiffusionPipeline(tokenizer, vae=vae, **options.build(tokenizer, vae, size)).eval()


def run_edits(pipe, cases: list[dict], method: str, strength: float, args, targets: list[str]) -> np.ndarray:
    """Edit every case (in batches of ``--batch-size``, one generator per image); (N, H, W, 3) uint8."""
    out = []
    for start in range(0, len(cases), args.batch_size):
        chunk = range(start, min(start + args.batch_size, len(cases)))
        images = pipe(
            prompt=[targets[i] for i in chunk],
            source_prompt=[cases[i]["scene"].caption for i in chunk],
            image=[cases[i]["image"] for i in chunk],
            strength=strength,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            source_guidance_scale=args.source_guidance,
            eta=args.eta,
            generator=[torch.Generator().manual_seed(args.seed + i) for i in chunk],
            output_type="np",
            method=method,
        ).images
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def save_example_grid(columns: list[np.ndarray], size: int, path: Path) -> Path:
    """Columns of (N, H, W, 3) uint8 images (source, then each method) as one PNG, a row per example."""
    tiles = torch.from_numpy(np.stack(columns, axis=1).reshape(-1, size, size, 3)).permute(0, 3, 1, 2) / 255.0
    return save_image(make_grid(tiles, nrow=len(columns)), path, scale=4)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a trained text-to-image pipeline (model or run folder)")
    parser.add_argument("--quick", action="store_true", help="2 images per kind, 2 strengths, 3 steps")
    parser.add_argument("--out", default="runs/edit_benchmark", help="folder for the JSON and the example grid")
    parser.add_argument("--n", type=int, default=24, help="images per edit kind")
    parser.add_argument("--methods", default=",".join(GENERAL_METHODS))
    parser.add_argument("--strengths", default=",".join(f"{s:g}" for s in STRENGTHS))
    parser.add_argument("--levels", default=",".join(f"{s:g}" for s in LEVELS), help="success levels to match")
    parser.add_argument("--texture", type=float, default=DEMO_WORLD.texture, help="background noise (demo: plain)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--source-guidance", type=float, default=1.0)
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=72, help="edits per pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.strengths, args.steps = 2, "0.5,0.8", 3
    methods = args.methods.split(",")
    strengths = [float(s) for s in args.strengths.split(",")]
    levels = tuple(float(s) for s in args.levels.split(","))
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    if args.model:
        pipe, source = CycleDiffusionPipeline.from_pretrained(args.model, device=args.device), args.model
    else:
        if not args.quick:
            parser.error("--model is required (without --quick)")
        pipe, source = fresh_pipeline().to(args.device), "fresh tiny pipeline (untrained)"
    size = pipe.denoiser.config.sample_size * pipe.latent_factor
    cases = make_cases(args.n, size, args.seed, args.texture)
    targets = [caption_for(c["target"]) for c in cases]
    grid_strength = min(strengths, key=lambda s: abs(s - GRID_STRENGTH))
    shown = [i for k in range(len(KINDS)) for i in range(k * args.n, k * args.n + min(2, args.n))]

    t_start = time.perf_counter()
    reconstruction = run_edits(pipe, cases, "sdedit", 0.0, args, targets)  # strength 0: through the VAE only
    records = [
        {"kind": c["kind"], "method": "reconstruction", "strength": 0.0, "index": i} | measure(c, reconstruction[i])
        for i, c in enumerate(cases)
    ]
    examples = {}
    timings = {}
    for method in methods:
        t0 = time.perf_counter()
        for strength in strengths:
            edited = run_edits(pipe, cases, method, strength, args, targets)
            for i, case in enumerate(cases):
                record = {"kind": case["kind"], "method": method, "strength": strength, "index": i}
                records.append(record | measure(case, edited[i], case["target"]))
            if strength == grid_strength:
                examples[method] = edited[shown]
        timings[method] = time.perf_counter() - t0
    seconds = time.perf_counter() - t_start

    rows = []
    for kind in KINDS:
        for method in ["reconstruction", *methods]:
            for strength in [0.0] if method == "reconstruction" else strengths:
                group = [r for r in records if (r["kind"], r["method"], r["strength"]) == (kind, method, strength)]
                rows.append({"kind": kind, "method": method, "strength": strength} | summarise(group))
    pooled = []
    for method in methods:
        for strength in strengths:
            group = [r for r in records if (r["method"], r["strength"]) == (method, strength)]
            pooled.append({"kind": "all", "method": method, "strength": strength} | summarise(group))
    summary = matched_success(pooled, levels)

    print(machine_line(args.device))
    print(versions_line())
    print(
        f"model: {source}; {size}x{size} images; {args.n} images per kind; {args.steps} steps, guidance "
        f"{args.guidance:g} (source {args.source_guidance:g}), eta {args.eta:g}; {seconds:.0f} s of editing "
        f"({', '.join(f'{m} {t:.0f} s' for m, t in timings.items())})\n"
    )
    print("| kind | method | strength | success | kept | IoU | PSNR-out (dB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [r["kind"], r["method"], f"{r['strength']:g}", fmt(r["success"]), fmt(r["kept"])]
        print("| " + " | ".join([*cells, fmt(r["iou"]), fmt(r["psnr_out"], 1)]) + " |")
    print("\nAll kinds pooled:\n")
    print("| method | strength | success | IoU | PSNR-out (dB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in pooled:
        print(
            f"| {r['method']} | {r['strength']:g} | {fmt(r['success'])} | {fmt(r['iou'])} | {fmt(r['psnr_out'], 1)} |"
        )
    print("\nAt matched success (all kinds pooled): the best IoU among strengths whose success reaches the level\n")
    print("| method | " + " | ".join(f"success >= {level:g}" for level in levels) + " |")
    print("| --- |" + " --- |" * len(levels))
    for method, by_level in summary.items():
        cells = [
            "not reached"
            if b is None
            else f"IoU {b['iou']:.3f}, PSNR-out {fmt(b['psnr_out'], 1)} (strength {b['strength']:g}, "
            f"success {b['success']:.2f})"
            for b in by_level.values()
        ]
        print(f"| {method} | " + " | ".join(cells) + " |")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_rows = [np.stack([cases[i]["image"] for i in shown])] + [examples[m] for m in methods if m in examples]
    grid = save_example_grid(grid_rows, size, out / "edit_examples.png")
    result = {
        "model": source,
        "image_size": size,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "device")},
        "seconds": seconds,
        "rows": rows,
        "pooled": pooled,
        "matched_success": summary,
        "examples": {
            "png": str(grid),
            "columns": ["source", *[f"{m} @ {grid_strength:g}" for m in methods]],
            "rows": [{"source": cases[i]["scene"].caption, "target": targets[i]} for i in shown],
        },
        "records": [r | {"source": cases[r["index"]]["scene"].caption, "target": targets[r["index"]]} for r in records],
    }
    (out / "edit_benchmark.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'edit_benchmark.json'} and {grid}")
    return result


if __name__ == "__main__":
    main()
