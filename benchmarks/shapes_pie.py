"""Shapes-PIE: a PIE-Bench-style edit benchmark on the shapes world, with exact masks from the renderer.

    python benchmarks/shapes_pie.py --model runs/demo/t2i                       # 7 edit types x 100, 3 seeds
    python benchmarks/shapes_pie.py --model runs/demo/t2i --n 20 --seeds 0     # a screen
    python benchmarks/shapes_pie.py --quick                                     # tiny untrained pipeline, seconds

Triplets (source image, source caption, target caption), ``--n`` per edit type, rendered by the shapes generator at
the model's size on the demo's plain background, each with its ideal edit (the target scene rendered) and the edit
mask (the pixels where source and ideal differ, dilated by a pixel):

- ``colour``, ``shape``, ``size``: one object ("a large red circle on the left") changes that attribute in place;
- ``position``: the object moves to another named place (the mask covers both places);
- ``add``: a small second object appears ("... and a blue square"); ``remove``: of two objects the second goes;
- ``change_one``: of two objects the second changes colour ("a red circle and a green square" -> "... a blue square").

Every variant edits the same triplets with the same prompts and per-image generators (``seed * 100003 + i``) at
each ``--strengths`` value and each seed. Variants: ``cycle``, ``ef_ddpm``, ``ddim_inversion``, ``sdedit``,
``flowedit`` (flow models), ``+p2p`` (attention coupling of the cross-attention for the first 80% of the steps;
``+p2p0.3`` for 30%, ``+p2p0.3s0.2`` with the self-attention for the first 20% too), ``+mask`` (the exact mask),
``+auto`` (the mask read from the model), ``+rs2`` (with a mask: each step taken 1 + 2 times, RePaint's
resampling), ``@20`` (20 steps instead of ``--steps``).

Per edit: success (ShapesEval reads the target caption, every criterion, on the edited image); preservation where
the mask is 0 (PSNR, SSIM map averaged there, MSE; and PIE-Bench's own convention, labelled ``pie_psnr``: both
images with the mask's pixels set to 0, PSNR over the whole image); IoU of the edited objects with the ideal edit's;
denoiser evaluations (``nfe``) and seconds per edit. Per variant and strength: means over triplets and seeds
(mean ± std over seeds), success-gated SSIM-out (``ssim_out`` where the edit succeeded, 0 where it failed, so that
doing nothing cannot win) and, per variant, preservation at matched success (the strength with the best PSNR-out
among those whose success reaches each level). The sanity gate checks the literature's ordering at the strength
nearest 0.8: DDIM inversion without coupling keeps least outside the mask among the inversion methods, CycleDiffusion
keeps most and edits less often. Writes ``OUT/shapes_pie.json`` and ``OUT/shapes_pie_examples.png``; every finished
(variant, strength, seed) cell is appended to ``OUT/records.jsonl`` as it ends, and the same command run again goes on
from the last finished cell.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import machine_line, versions_line
from edit_benchmark import dilate, foreground, fresh_pipeline, iou, mean, psnr_outside, save_example_grid

from cyclediffusion import CycleDiffusionPipeline
from cyclediffusion.data.shapes import (
    DEFAULT_COLOURS,
    GAP,
    MARGIN,
    POSITIONS,
    SHAPES,
    SIZES,
    Prompt,
    Scene,
    ShapeObject,
    ShapesConfig,
    caption_for,
    render,
    sample_scene,
)
from cyclediffusion.diffusion import FlowMatching
from cyclediffusion.eval import detect_objects, score
from cyclediffusion.eval.vae_eval import ssim_map
from cyclediffusion.pipelines.coupling import AttentionCoupling

EDIT_TYPES = ("colour", "shape", "size", "position", "add", "remove", "change_one")
BASE_METHODS = ("cycle", "ef_ddpm", "ddim_inversion", "sdedit", "flowedit")
DEFAULT_VARIANTS = ("cycle", "cycle+p2p", "ef_ddpm", "ddim_inversion", "ddim_inversion+p2p", "sdedit", "flowedit",
                    "cycle+mask", "ef_ddpm+mask", "ef_ddpm+mask+rs2", "cycle+auto", "cycle@20")  # fmt: skip
STRENGTHS = (0.6, 0.8, 1.0)
LEVELS = (0.5, 0.75, 0.9)
GATE_STRENGTH = 0.8
PARTIAL = "records.jsonl"  # one line of settings, then every edit's record as its cell finishes


# ----------------------------------------------------------------------------- the triplets
def fits(obj: ShapeObject) -> bool:
    r = obj.radius
    return all(r + MARGIN <= c <= 1 - r - MARGIN for c in (obj.x, obj.y))


def apart(a: ShapeObject, b: ShapeObject) -> bool:
    """The bounding boxes are at least ``GAP`` apart along x or y."""
    gap = a.radius + b.radius + GAP
    return abs(a.x - b.x) >= gap or abs(a.y - b.y) >= gap


def single_source(rng: np.random.Generator) -> Scene:
    """One object whose caption names its size and position (so that both can be edited in words)."""
    prompt = Prompt("single", (str(rng.choice(DEFAULT_COLOURS)),), (str(rng.choice(SHAPES)),),
                    size=str(rng.choice(list(SIZES))), position=str(rng.choice(list(POSITIONS))))  # fmt: skip
    x, y = POSITIONS[prompt.position]
    obj = ShapeObject(prompt.shapes[0], prompt.colours[0], prompt.size, x, y)
    return Scene((obj,), caption_for(prompt), "single", prompt)


def pair_source(rng: np.random.Generator, size: int) -> Scene:
    return sample_scene(rng, ShapesConfig(size=size, kinds={"pair": 1.0}, texture=0.0))


def other(rng: np.random.Generator, values, *not_these: str) -> str:
    return str(rng.choice([v for v in values if v not in not_these]))


def edit_of(kind: str, rng: np.random.Generator, size: int) -> tuple[Scene, Scene] | None:
    """(source scene, ideal target scene) of one edit of ``kind``; None when the draw cannot be laid out."""
    if kind in ("remove", "change_one"):
        src = pair_source(rng, size)
        a, b = src.objects
        if kind == "remove":
            prompt = Prompt("single", (a.colour,), (a.shape,))
            return src, Scene((a,), caption_for(prompt), "single", prompt)
        b2 = replace(b, colour=other(rng, DEFAULT_COLOURS, a.colour, b.colour))
        prompt = replace(src.prompt, colours=(a.colour, b2.colour))
        return src, Scene((a, b2), caption_for(prompt), "pair", prompt)
    src = single_source(rng)
    obj, p = src.objects[0], src.prompt
    if kind == "colour":
        prompt = replace(p, colours=(other(rng, DEFAULT_COLOURS, obj.colour),))
        new = replace(obj, colour=prompt.colours[0])
    elif kind == "shape":
        prompt = replace(p, shapes=(other(rng, SHAPES, obj.shape),))
        new = replace(obj, shape=prompt.shapes[0])
    elif kind == "size":
        prompt = replace(p, size=other(rng, SIZES, obj.size))
        new = replace(obj, size=prompt.size)
    elif kind == "position":
        prompt = replace(p, position=other(rng, POSITIONS, p.position))
        new = replace(obj, x=POSITIONS[prompt.position][0], y=POSITIONS[prompt.position][1])
    elif kind == "add":
        colour, shape = other(rng, DEFAULT_COLOURS, obj.colour), str(rng.choice(SHAPES))
        places = [ShapeObject(shape, colour, "small", x, y) for x, y in POSITIONS.values()]
        places = [q for q in places if fits(q) and apart(obj, q)]
        if not places:
            return None
        second = places[int(rng.integers(len(places)))]
        prompt = Prompt("pair", (obj.colour, colour), (obj.shape, shape))
        return src, Scene((obj, second), caption_for(prompt), "pair", prompt)
    else:
        raise ValueError(f"unknown edit type {kind!r}")
    if not fits(new):
        return None
    return src, Scene((new,), caption_for(prompt), "single", prompt)


def make_triplets(n: int, size: int, seed: int = 0) -> list[dict]:
    """``n`` triplets per edit type: images (uint8), captions, target prompt, ideal edit and the exact mask."""
    cases = []
    for k, kind in enumerate(EDIT_TYPES):
        rng = np.random.default_rng([seed, 7919 + k])
        while sum(c["kind"] == kind for c in cases) < n:
            made = edit_of(kind, rng, size)
            if made is None:
                continue
            src, tgt = made
            image, ideal = np.asarray(render(src, size)), np.asarray(render(tgt, size))
            mask = dilate((image != ideal).any(-1))
            cases.append({"kind": kind, "source": src.caption, "target": tgt.caption, "prompt": tgt.prompt,
                          "image": image, "ideal": ideal, "mask": mask})  # fmt: skip
    return cases


# ----------------------------------------------------------------------------- metrics
def preservation(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and MSE where ``mask`` is 0, and PIE-Bench's masked whole-image PSNR. SSIM's windows would reach
    into the edit near its border, so it compares the source with the edit whose masked pixels are the source's."""
    outside = ~mask
    kept = np.where(mask[..., None], source, edited)  # the edit's own pixels out of SSIM's windows
    x, y = (torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].double() / 255 for a in (source, kept))
    local = ssim_map(x, y, padding=True)[0].mean(0).numpy()
    diff = (source.astype(np.float64) - edited.astype(np.float64)) / 255
    keep = outside[..., None]
    pie_mse = float(((diff * keep) ** 2).mean())
    return {
        "psnr_out": psnr_outside(source, edited, mask),
        "ssim_out": float(local[outside].mean()) if outside.any() else float("nan"),
        "mse_out": float((diff[outside] ** 2).mean()) if outside.any() else float("nan"),
        "pie_psnr": 100.0 if pie_mse == 0 else min(100.0, 10 * math.log10(1 / pie_mse)),
    }


def measure(case: dict, edited: np.ndarray) -> dict:
    """Success, preservation outside the mask and object IoU of one edited image (uint8 (H, W, 3))."""
    result = score(case["prompt"], detect_objects(edited))
    record = {"success": bool(result["correct"]), "iou": iou(foreground(case["ideal"]), foreground(edited))}
    return record | preservation(case["image"], edited, case["mask"])


# ----------------------------------------------------------------------------- variants and editing
COUPLING = re.compile(r"p2p(\d*\.?\d+)?(?:s(\d*\.?\d+))?")  # p2p[CROSS][sSELF]: shares of the steps coupled
RESAMPLE = re.compile(r"rs(\d+)")  # rsN: each masked step taken 1 + N times (RePaint)
VARIANT_SYNTAX = "METHOD[+p2p[CROSS[sSELF]]][+mask|+auto][+rsN][@STEPS]"


def parse_variant(name: str, steps: int) -> dict:
    """``cycle+p2p0.4@20`` -> method, coupling, mask mode, resampling passes and steps."""
    base, _, at = name.partition("@")
    method, *extras = base.split("+")
    coupling, resample = None, 0
    for extra in extras:
        if match := COUPLING.fullmatch(extra):
            cross, self_ = match.groups()
            coupling = AttentionCoupling(float(cross or AttentionCoupling.cross_steps), float(self_ or 0.0))
        elif match := RESAMPLE.fullmatch(extra):
            resample = int(match.group(1))
        elif extra not in ("mask", "auto"):
            method = None
    if method not in BASE_METHODS:
        raise ValueError(f"unknown variant {name!r}: {VARIANT_SYNTAX}, METHOD in {BASE_METHODS}")
    return {"method": method, "coupling": coupling, "resample": resample,
            "mask": "exact" if "mask" in extras else "auto" if "auto" in extras else None,
            "steps": int(at) if at else steps}  # fmt: skip


def run_variant(pipe, cases: list[dict], spec: dict, strength: float, seed: int, args) -> tuple[np.ndarray, float]:
    """Edit every case; (N, H, W, 3) uint8 and the mean denoiser evaluations per edit."""
    out, nfe = [], []
    for start in range(0, len(cases), args.batch_size):
        chunk = range(start, min(start + args.batch_size, len(cases)))
        mask = None
        if spec["mask"] == "exact":
            mask = [torch.from_numpy(cases[i]["mask"].astype(np.float32)) for i in chunk]
        elif spec["mask"] == "auto":
            mask = "auto"
        result = pipe(
            prompt=[cases[i]["target"] for i in chunk],
            source_prompt=[cases[i]["source"] for i in chunk],
            image=[cases[i]["image"] for i in chunk],
            strength=strength,
            num_inference_steps=spec["steps"],
            guidance_scale=args.guidance,
            source_guidance_scale=args.source_guidance,
            eta=args.eta,
            generator=[torch.Generator().manual_seed(seed * 100003 + i) for i in chunk],
            output_type="np",
            method=spec["method"],
            mask_image=mask,
            coupling=spec["coupling"],
            resample=spec["resample"],
        )
        out.append(np.clip(np.rint(result.images * 255), 0, 255).astype(np.uint8))
        nfe.append(result.nfe * len(chunk))
    return np.concatenate(out), sum(nfe) / len(cases)


def aggregate(records: list[dict], seeds: list[int]) -> dict:
    """Means over the records; each metric's std over the seeds' means; success-gated SSIM-out."""
    keys = ("success", "psnr_out", "ssim_out", "mse_out", "pie_psnr", "iou", "nfe", "seconds")
    row = {"n": len(records)}
    for key in keys:
        per_seed = [mean(r[key] for r in records if r["seed"] == s) for s in seeds]
        per_seed = [v for v in per_seed if v is not None]
        row[key] = float(np.mean(per_seed)) if per_seed else None
        row[f"{key}_std"] = float(np.std(per_seed)) if len(per_seed) > 1 else 0.0
    gated = [mean((r["ssim_out"] if r["success"] else 0.0) for r in records if r["seed"] == s) for s in seeds]
    row["gated_ssim_out"] = float(np.mean(gated))
    row["gated_ssim_out_std"] = float(np.std(gated)) if len(gated) > 1 else 0.0
    return row


def matched(rows: list[dict], levels: tuple[float, ...]) -> dict:
    """Per variant and success level: the strength with the best PSNR-out among those reaching the level."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant and r["kind"] == "all"]
        out[variant] = {}
        for level in levels:
            ok = [r for r in mine if r["success"] is not None and r["success"] >= level]
            best = max(ok, key=lambda r: r["psnr_out"], default=None)
            out[variant][f"{level:g}"] = None if best is None else {
                k: best[k] for k in ("strength", "success", "psnr_out", "ssim_out")}  # fmt: skip
    return out


def sanity_gate(rows: list[dict], strength: float) -> dict:
    """The literature's ordering at ``strength``: DDIM inversion (no coupling) keeps least outside the mask among
    the inversion methods, CycleDiffusion keeps most and succeeds least often."""
    at = {r["variant"]: r for r in rows if r["kind"] == "all" and r["strength"] == strength}
    inversion = [v for v in ("cycle", "ef_ddpm", "ddim_inversion") if v in at]
    if len(inversion) < 3:
        return {"checked": False, "why": "needs cycle, ef_ddpm and ddim_inversion"}
    psnr = {v: at[v]["psnr_out"] for v in inversion}
    success = {v: at[v]["success"] for v in inversion}
    return {
        "checked": True,
        "strength": strength,
        "ddim_inversion_keeps_least": min(psnr, key=psnr.get) == "ddim_inversion",
        "cycle_keeps_most": max(psnr, key=psnr.get) == "cycle",
        "cycle_edits_least": min(success, key=success.get) == "cycle",
        "psnr_out": psnr,
        "success": success,
    }


def resume_records(
    out: Path, settings: dict, cases: list[dict]
) -> tuple[list[dict], dict[str, np.ndarray], set[tuple[str, float, int]]]:
    """The records, example rows and finished (variant, strength, seed) cells of an earlier run into ``out`` with
    the same settings (a stopped run goes on where it stopped); otherwise a fresh ``out/records.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    path, header = out / PARTIAL, json.dumps(settings, sort_keys=True)
    lines = path.read_text().splitlines() if path.is_file() else []
    records = [json.loads(line) for line in lines[1:] if line.strip()] if lines[:1] == [header] else []
    cells: dict[tuple[str, float, int], int] = {}
    for r in records:
        key = (r["variant"], r["strength"], r["seed"])
        cells[key] = cells.get(key, 0) + 1
    done = {key for key, count in cells.items() if count == len(cases)}
    records = [r for r in records if (r["variant"], r["strength"], r["seed"]) in done]
    path.write_text(header + "\n" + "".join(json.dumps(r) + "\n" for r in records))  # a cut-off cell's lines go
    examples = {}
    for name in {key[0] for key in done}:
        saved = out / f"examples_{name}.npy"
        if saved.is_file():
            examples[name] = np.load(saved, allow_pickle=False)
    if done:
        print(f"resuming: {len(done)} finished cells read from {path}", file=sys.stderr)
    return records, examples, done


def fmt(value: float | None, std: float | None = None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a trained text-to-image pipeline (model or run folder)")
    parser.add_argument("--quick", action="store_true", help="2 triplets per type, 1 strength, 3 steps, 2 seeds")
    parser.add_argument("--out", default="runs/shapes_pie", help="folder for the JSON and the example grid")
    parser.add_argument("--n", type=int, default=100, help="triplets per edit type (7 types)")
    parser.add_argument("--seeds", default="0,1,2", help="edit seeds (the triplets stay those of seed 0)")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated {VARIANT_SYNTAX}, e.g. cycle+p2p0.2 (coupled for 20%% of the steps)",
    )
    parser.add_argument("--strengths", default=",".join(f"{s:g}" for s in STRENGTHS))
    parser.add_argument("--levels", default=",".join(f"{s:g}" for s in LEVELS), help="success levels to match")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--source-guidance", type=float, default=1.0)
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100, help="edits per pipeline call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.strengths, args.steps, args.seeds = 2, "0.8", 3, "0,1"
    seeds = [int(s) for s in args.seeds.split(",")]
    strengths = [float(s) for s in args.strengths.split(",")]
    levels = tuple(float(s) for s in args.levels.split(","))
    if args.model:
        pipe, source = CycleDiffusionPipeline.from_pretrained(args.model, device=args.device), args.model
    elif args.quick:
        pipe, source = fresh_pipeline().to(args.device), "fresh tiny pipeline (untrained)"
    else:
        parser.error("--model is required (without --quick)")
    flow = isinstance(pipe.noise_process, FlowMatching)
    names = [v for v in args.variants.split(",") if flow or not v.startswith("flowedit")]
    try:
        specs = {name: parse_variant(name, args.steps) for name in names}
    except ValueError as err:
        parser.error(str(err))
    size = pipe.denoiser.config.sample_size * pipe.latent_factor
    cases = make_triplets(args.n, size)
    shown = [i for k in range(len(EDIT_TYPES)) for i in range(k * args.n, k * args.n + 1)]

    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device", "batch_size")}
    records, examples, done = resume_records(out, settings, cases)
    t_start, cells = time.perf_counter(), len(specs) * len(strengths) * len(seeds)
    with (out / PARTIAL).open("a") as log:
        for name, spec in specs.items():
            for strength in strengths:
                for seed in seeds:
                    if (name, strength, seed) in done:
                        continue
                    t0 = time.perf_counter()
                    edited, nfe = run_variant(pipe, cases, spec, strength, seed, args)
                    seconds = (time.perf_counter() - t0) / len(cases)
                    cell = []
                    for i, case in enumerate(cases):
                        record = {"variant": name, "kind": case["kind"], "strength": strength, "seed": seed, "index": i}
                        cell.append(record | measure(case, edited[i]) | {"nfe": nfe, "seconds": seconds})
                    if seed == seeds[0] and strength == min(strengths, key=lambda s: abs(s - GATE_STRENGTH)):
                        examples[name] = edited[shown]
                        np.save(out / f"examples_{name}.npy", examples[name])
                    records += cell
                    log.write("".join(json.dumps(r) + "\n" for r in cell))
                    log.flush()
                    done.add((name, strength, seed))
                    success = sum(r["success"] for r in cell) / len(cell)
                    print(f"[{len(done)}/{cells}] {name} strength {strength:g} seed {seed}: success {success:.3f}, "
                          f"{seconds:.3f} s/edit", file=sys.stderr, flush=True)  # fmt: skip
    total = time.perf_counter() - t_start

    rows = []
    for name in specs:
        for strength in strengths:
            mine = [r for r in records if r["variant"] == name and r["strength"] == strength]
            rows.append({"variant": name, "kind": "all", "strength": strength} | aggregate(mine, seeds))
            for kind in EDIT_TYPES:
                group = [r for r in mine if r["kind"] == kind]
                rows.append({"variant": name, "kind": kind, "strength": strength} | aggregate(group, seeds))
    summary = matched(rows, levels)
    gate = sanity_gate(rows, min(strengths, key=lambda s: abs(s - GATE_STRENGTH)))

    print(machine_line(args.device))
    print(versions_line())
    print(f"model: {source}; {size}x{size}; {len(cases)} triplets ({args.n} per type) x {len(seeds)} seeds; "
          f"{args.steps} steps, guidance {args.guidance:g} (source {args.source_guidance:g}), eta {args.eta:g}; "
          f"{total:.0f} s of editing\n")  # fmt: skip
    print("| variant | strength | success | PSNR-out (dB) | SSIM-out | gated SSIM-out | MSE-out | PIE PSNR (dB) "
          "| IoU | nfe | s/edit |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["kind"] != "all":
            continue
        cells = [r["variant"], f"{r['strength']:g}", fmt(r["success"], r["success_std"]),
                 fmt(r["psnr_out"], r["psnr_out_std"], 1), fmt(r["ssim_out"], r["ssim_out_std"]),
                 fmt(r["gated_ssim_out"], r["gated_ssim_out_std"]), fmt(r["mse_out"], digits=5),
                 fmt(r["pie_psnr"], digits=1), fmt(r["iou"]), f"{r['nfe']:.0f}", f"{r['seconds']:.3f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print("\nSuccess per edit type (strength nearest 0.8):\n")
    print("| variant | " + " | ".join(EDIT_TYPES) + " |")
    print("| --- |" + " ---: |" * len(EDIT_TYPES))
    near = min(strengths, key=lambda s: abs(s - GATE_STRENGTH))
    for name in specs:
        by_kind = {r["kind"]: r for r in rows if r["variant"] == name and r["strength"] == near}
        print(f"| {name} | " + " | ".join(fmt(by_kind[k]["success"], digits=2) for k in EDIT_TYPES) + " |")
    print("\nAt matched success: the best PSNR-out among strengths whose success reaches the level\n")
    print("| variant | " + " | ".join(f"success >= {level:g}" for level in levels) + " |")
    print("| --- |" + " --- |" * len(levels))
    for name, by_level in summary.items():
        cells = ["not reached" if b is None else f"{b['psnr_out']:.1f} dB (strength {b['strength']:g}, success "
                 f"{b['success']:.2f})" for b in by_level.values()]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nsanity gate: {json.dumps(gate)}")

    grid_rows = [np.stack([cases[i]["image"] for i in shown]), np.stack([cases[i]["ideal"] for i in shown])]
    grid_rows += [examples[name] for name in specs if name in examples]
    grid = save_example_grid(grid_rows, size, out / "shapes_pie_examples.png")
    result = {
        "model": source,
        "image_size": size,
        "settings": settings,
        "seconds": total,  # of this invocation (a resumed run's earlier cells not included)
        "rows": rows,
        "matched_success": summary,
        "sanity_gate": gate,
        "examples": {"png": str(grid), "columns": ["source", "ideal", *specs],
                     "rows": [{"source": cases[i]["source"], "target": cases[i]["target"]} for i in shown]},
        "records": records,
    }  # fmt: skip
    (out / "shapes_pie.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'shapes_pie.json'} and {grid}")
    return result


if __name__ == "__main__":
    main()
