"""ShapesEval: a GenEval-style text-alignment benchmark on the synthetic shapes world, offline and exact.

:func:`detect_objects` reads the objects back from an image by the world's palette and geometry: a pixel is
foreground when it lies at least half way from the grey background to a palette colour (the nearest
background-to-colour line names its colour); 8-connected components under ``MIN_AREA`` are specks. Each
object is measured on its soft coverage (alpha): width and height are the sums of column and row maxima; a
triangle (apex up) has its area centroid 1/6 of its height below the middle of its box; otherwise
``fill = area / (width * height)`` tells a square (~1) from a circle (~pi/4). :func:`score` checks detections
against what a :class:`~cyclediffusion.data.Prompt` says, and :func:`evaluate` runs a whole suite.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.shapes import (
    BACKGROUND,
    COLOURS,
    KINDS,
    POSITIONS,
    RELATIONS,
    Prompt,
    Scene,
    ShapesConfig,
    caption_for,
    layout,
    parse_caption,
    prompt_suite,
    render,
    sample_prompt,
    world_holdout,
)
from ..progress import progress as progress_bar

CATEGORIES: tuple[str, ...] = (
    "colour",  # bare single objects, judged on the number of objects and their colour only
    "shape",  # the same prompts, judged on the number of objects and their shape only
    "single",  # single objects, colour and shape (and size where the prompt names it)
    "position",  # single objects with a position phrase
    "counting",  # "two red circles": exactly that many, nothing else
    "attribute_binding",  # "a red circle and a blue square": both, with the right colour-shape binding
    "relative_position",  # "a red circle above a blue square": both, and the relation holds
    "held_out",  # colour-shape combinations never drawn in training, e.g. "purple triangle"
)
MIN_AREA = 0.008  # components with fewer foreground pixels than this fraction of the image are specks
FOREGROUND = 0.5  # least projection of a pixel on the background-to-colour line to be foreground
OFF_LINE = 0.35  # a pixel farther than this (times |colour - background|) from the line is not that colour
MIXED = 0.25  # a component is split by colour when a second colour holds this share of its pixels
TRIANGLE_DROP = 0.05  # area centroid below the box centre by this fraction of the height: a triangle
SQUARE_FILL = 0.84  # otherwise fill above this: a square (~1.0, blurred ~0.9), else a circle (~0.79)
IDEAL_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # area / box area of each shape
LARGE = 0.37  # box side (sqrt(area / ideal fill), a fraction of the image side) above which it is large

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64)
_BACKGROUND = np.array(BACKGROUND, dtype=np.float64)


@dataclass(frozen=True)
class Detection:
    """One object found in an image; ``x, y`` (box centre), ``width``, ``height`` are fractions of the
    image side, ``area`` a fraction of the image, ``mask`` the (H, W) boolean foreground of the object."""

    colour: str
    shape: str
    size: str
    x: float
    y: float
    width: float
    height: float
    area: float
    mask: np.ndarray = field(repr=False, compare=False)
    fill: float = 0.0

    def summary(self) -> dict:
        """JSON-ready attributes (no mask)."""
        named = {"colour": self.colour, "shape": self.shape, "size": self.size}
        return named | {k: round(getattr(self, k), 3) for k in ("x", "y", "width", "height", "area", "fill")}


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in 0-255 from a PIL image or a uint8 / [0, 1] float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    scale = 255.0 if np.issubdtype(array.dtype, np.floating) else 1.0
    return array[..., :3].astype(np.float64) * scale


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary dilation by a (2 steps + 1) square."""
    h, w = mask.shape
    p, n = np.pad(mask, steps), 2 * steps + 1
    return np.logical_or.reduce([p[i : i + h, j : j + w] for i in range(n) for j in range(n)])


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components: labels 1..n (0 off the mask), by min-label propagation with pointer jumping."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        new = np.where(mask, np.minimum.reduce([p[i : i + h, j : j + w] for i in range(3) for j in range(3)]), big)
        new = np.append(new.ravel(), big)[new]  # adopt the label of one's label
        if np.array_equal(new, labels):
            break
        labels = new
    roots = np.unique(labels[mask])
    return np.where(mask, np.searchsorted(roots, labels) + 1, 0), len(roots)


def _measure(pixels: np.ndarray, mask: np.ndarray, foreground: np.ndarray, k: int) -> Detection:
    """Size, position and shape of the object of colour ``k`` whose foreground is ``mask`` (from soft alpha)."""
    (H, W), (rows, cols) = mask.shape, np.nonzero(mask)
    edge = max(1, round(max(H, W) / 32))  # soft edges reach about a pixel out at 32 px
    r0, r1 = max(rows.min() - 2 * edge, 0), min(rows.max() + 2 * edge + 1, H)
    c0, c1 = max(cols.min() - 2 * edge, 0), min(cols.max() + 2 * edge + 1, W)
    win, m, near = pixels[r0:r1, c0:c1], mask[r0:r1, c0:c1], _dilate(mask, edge)[r0:r1, c0:c1]
    around = win[~near & ~foreground[r0:r1, c0:c1]]  # the local background, textured or not
    bg = np.median(around, axis=0) if len(around) >= 4 else _BACKGROUND
    d = _PALETTE[k] - bg
    t = (win - bg) @ d / max(d @ d, 1.0)
    off = np.linalg.norm(win - bg - np.clip(t, 0, 1)[..., None] * d, axis=-1) > OFF_LINE * np.linalg.norm(d)
    scale = max(float(np.percentile(t[m], 80)), 0.3)  # a model's colour may be a little off the palette's
    alpha = np.where(near & ~off & ~(foreground & ~mask)[r0:r1, c0:c1], np.clip(t / scale, 0, 1), 0.0)
    colmax, rowmax, area = alpha.max(0), alpha.max(1), max(alpha.sum(), 1e-9)
    width, height = max(colmax.sum(), 1e-9), max(rowmax.sum(), 1e-9)
    fill = area / (width * height)
    cx, cy = (colmax * (np.arange(c1 - c0) + 0.5)).sum() / width, (rowmax * (np.arange(r1 - r0) + 0.5)).sum() / height
    drop = ((alpha.sum(1) * (np.arange(r1 - r0) + 0.5)).sum() / area - cy) / height
    shape = "triangle" if drop > TRIANGLE_DROP else "square" if fill > SQUARE_FILL else "circle"
    size = "large" if math.sqrt(area / (H * W) / IDEAL_FILL[shape]) > LARGE else "small"  # area survives blur
    box = [float(v) for v in ((c0 + cx) / W, (r0 + cy) / H, width / W, height / H, area / (H * W))]
    return Detection(_NAMES[k], shape, size, *box, mask=mask, fill=float(fill))


def detect_objects(image: Image.Image | np.ndarray) -> list[Detection]:
    """The coloured objects in ``image`` (PIL, or (H, W, 3) uint8 or float in [0, 1]), largest first."""
    pixels = _pixels(image)
    H, W = pixels.shape[:2]
    v, d = pixels - _BACKGROUND, _PALETTE - _BACKGROUND
    t = np.clip(v @ d.T / (d * d).sum(1), 0, 1)  # (H, W, K) position along each background-to-colour line
    best = np.linalg.norm(v[..., None, :] - t[..., None] * d, axis=-1).argmin(-1)
    foreground = np.take_along_axis(t, best[..., None], -1)[..., 0] >= FOREGROUND
    min_pixels = max(MIN_AREA * H * W, 3)
    labels, n = _label(foreground)
    found = []
    for i in range(1, n + 1):
        component = labels == i
        size = component.sum()
        if size < min_pixels:
            continue
        votes = np.bincount(best[component], minlength=len(_NAMES))
        colours = [k for k in np.argsort(-votes) if votes[k] >= max(min_pixels, MIXED * size)]
        if len(colours) <= 1:  # one object (stray pixels of other colours are noise)
            found.append(_measure(pixels, component, foreground, int(votes.argmax())))
            continue
        for k in colours:  # touching objects of different colours
            parts, m = _label(component & (best == k))
            for j in range(1, m + 1):
                if (part := parts == j).sum() >= min_pixels:
                    found.append(_measure(pixels, part, foreground, int(k)))
    return sorted(found, key=lambda det: -det.area)


def nearest_position(det: Detection) -> str:
    """The position anchor of :data:`~cyclediffusion.data.POSITIONS` nearest to the object's centre."""
    return min(POSITIONS, key=lambda k: math.hypot(det.x - POSITIONS[k][0], det.y - POSITIONS[k][1]))


def relation_holds(relation: str, a: Detection, b: Detection) -> bool:
    """Whether ``a <relation> b``: the centres differ in the named direction, along the dominant axis."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; choose from {RELATIONS}")
    dx, dy = b.x - a.x, b.y - a.y  # positive when a is left of / above b
    along, across = (dy, dx) if relation in ("above", "below") else (dx, dy)
    if relation in ("below", "to the right of"):
        along = -along
    return along > 0 and abs(along) > abs(across)


def score(prompt: Prompt, detections: Sequence[Detection]) -> dict[str, bool]:
    """Per-criterion results and ``correct`` (all of them): ``number`` (as many objects as the prompt says),
    ``colour`` / ``shape`` (the set of colours / shapes found is the one asked for), ``objects`` (exactly the
    asked colour-shape objects), and ``size``, ``position``, ``relation`` where the prompt names them."""
    want = list(zip(prompt.colours, prompt.shapes)) * (prompt.count if prompt.kind == "count" else 1)
    got = [(det.colour, det.shape) for det in detections]
    result = {
        "number": len(got) == len(want),
        "colour": {c for c, _ in got} == {c for c, _ in want},
        "shape": {s for _, s in got} == {s for _, s in want},
        "objects": Counter(got) == Counter(want),
    }
    named = [next((det for det in detections if (det.colour, det.shape) == w), None) for w in want[:2]]
    target = named[0] or max(detections, key=lambda det: det.area, default=None)
    if prompt.size:
        result["size"] = target is not None and target.size == prompt.size
    if prompt.position:
        result["position"] = target is not None and nearest_position(target) == prompt.position
    if prompt.kind == "relation":
        a, b = named
        result["relation"] = a is not None and b is not None and relation_holds(prompt.relation or "", a, b)
    result["correct"] = all(result.values())
    return result


def category_correct(category: str, result: dict[str, bool]) -> bool:
    """Whether a :func:`score` result passes ``category``: ``colour`` and ``shape`` look at the number of
    objects and that one attribute; every other category asks for everything the prompt says."""
    if category in ("colour", "shape"):
        return result["number"] and result[category]
    return result["correct"]


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the suite: its text, what it says, and the category it is counted in."""

    text: str
    prompt: Prompt
    category: str


def build_suite(
    config: ShapesConfig | None = None,
    per_kind: int = 20,
    held_out: tuple[str, ...] = ("purple triangle",),
    seed: int = 0,
) -> list[EvalPrompt]:
    """The fixed benchmark (deterministic in its arguments). Every allowed colour-shape as a bare single object
    (in ``colour`` and ``shape``), ``per_kind`` distinct prompts of each other category, and each ``held_out``
    combination bare, at every size and at every position (``held_out``). Combinations held out, by
    ``held_out`` or by ``config.holdout``, appear in no other category."""
    config = config or ShapesConfig()
    seen = replace(config, holdout=tuple(dict.fromkeys((*config.holdout, *held_out))), kinds=dict(KINDS))
    base = prompt_suite(seen, per_kind=per_kind, seed=seed)
    by_kind = {"colour": "single", "shape": "single", "counting": "count"}
    by_kind |= {"attribute_binding": "pair", "relative_position": "relation"}
    suite = {cat: [p for p in base if p.kind == kind] for cat, kind in by_kind.items()}
    for k, (cat, p_size, p_position) in enumerate((("single", 0.5, 0.0), ("position", 0.0, 1.0))):
        only = replace(seen, kinds={"single": 1.0}, p_size=p_size, p_position=p_position)
        rng, drawn = np.random.default_rng([seed, 100 + k]), {}
        for _ in range(per_kind * 20):  # distinct prompts, as in prompt_suite
            drawn.setdefault(caption_for(p := sample_prompt(rng, only)), p)
            if len(drawn) == per_kind:
                break
        suite[cat] = list(drawn.values())
    variants = [{}] + [{"size": z} for z in seen.sizes] + [{"position": q} for q in seen.positions]
    suite["held_out"] = [Prompt("single", (h.split()[0],), (h.split()[1],), **v) for h in held_out for v in variants]
    return [EvalPrompt(caption_for(p), p, cat) for cat in CATEGORIES for p in suite[cat]]


@dataclass
class EvalReport:
    """Per-sample ``records`` (text, category, sample, correct, criteria, detections) and the images of the
    failed ones (``failure_images[i]`` goes with ``failures[i]``)."""

    records: list[dict]
    failure_images: list[Image.Image] = field(default_factory=list, repr=False)

    @property
    def failures(self) -> list[dict]:
        """The records scored wrong."""
        return [r for r in self.records if not r["correct"]]

    @property
    def counts(self) -> dict[str, int]:
        """Samples per category (categories of :data:`CATEGORIES` first, in order)."""
        counts = Counter(r["category"] for r in self.records)
        return {c: counts[c] for c in (*CATEGORIES, *sorted(set(counts) - set(CATEGORIES))) if counts[c]}

    @property
    def accuracy(self) -> dict[str, float]:
        """Share of correct samples per category."""
        right = Counter(r["category"] for r in self.records if r["correct"])
        return {c: right[c] / n for c, n in self.counts.items()}

    @property
    def overall(self) -> float:
        """Mean of the per-category accuracies (every category weighs the same, as in GenEval)."""
        return float(np.mean(list(self.accuracy.values()))) if self.records else 0.0

    def table(self) -> str:
        """A Markdown table: n and accuracy per category, then the overall score."""
        lines = ["| category | n | accuracy |", "| --- | ---: | ---: |"]
        lines += [f"| {c} | {n} | {self.accuracy[c]:.3f} |" for c, n in self.counts.items()]
        return "\n".join([*lines, f"| **overall** | {len(self.records)} | {self.overall:.3f} |"])

    def to_json(self) -> dict:
        """JSON-ready: overall, every category of :data:`CATEGORIES` (n, accuracy; None where empty), records."""
        categories = {c: {"n": 0, "accuracy": None} for c in CATEGORIES}
        categories |= {c: {"n": n, "accuracy": self.accuracy[c]} for c, n in self.counts.items()}
        return {"overall": self.overall, "categories": categories, "records": self.records, "failures": self.failures}

    def save(self, folder: str | Path) -> Path:
        """Write ``shapes_eval.json`` (:meth:`to_json`) and ``failures.png`` (:meth:`save_failure_grid`) to
        ``folder``, as ``cyclediffusion eval`` does; returns the JSON's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "shapes_eval.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        self.save_failure_grid(folder / "failures.png")
        return folder / "shapes_eval.json"

    def save_failure_grid(self, path: str | Path, max_images: int = 64, cell: int = 64) -> Path | None:
        """Write up to ``max_images`` distinct failed images as a PNG grid (row by row) at ``path`` and their
        prompts, categories, criteria and detections, in the same order, to ``path`` with suffix ``.json``.
        Returns the PNG's path, or None (only the JSON, empty) when nothing failed."""
        path, shown, picked = Path(path), set(), []
        for record, image in zip(self.failures, self.failure_images):
            if (key := (record["text"], record["sample"])) not in shown and len(picked) < max_images:
                shown.add(key)
                picked.append((record, image))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps([r for r, _ in picked], indent=1))
        if not picked:
            return None
        columns = math.ceil(math.sqrt(len(picked)))
        rows, pad = math.ceil(len(picked) / columns), 2
        grid = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + pad) + pad), (255, 255, 255))
        for i, (_, image) in enumerate(picked):
            tile = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (pad + (i % columns) * (cell + pad), pad + (i // columns) * (cell + pad)))
        grid.save(path, format="PNG")
        return path


def training_holdout(model_dir: str | Path) -> tuple[str, ...]:
    """The colour-shape pairs held out of a model's training data: ``world.json`` of the shapes folder named in the
    run's ``options.yaml`` (beside the model folder), or none when the run, its options or that folder is not here.
    ShapesEval's held-out category is built from them, and they stay out of the other categories."""
    import yaml

    options = Path(model_dir).parent / "options.yaml"
    if not options.is_file():
        return ()
    data = (yaml.safe_load(options.read_text()) or {}).get("data") or {}
    folder = data.get("data") if isinstance(data, dict) else None
    return (world_holdout(folder) or ()) if isinstance(folder, str) else ()


def ground_truth(prompts: list[str], seed_offset: int, size: int = 32, texture: float = 0.0) -> list[Image.Image]:
    """A perfect model's ``generate_fn`` for :func:`evaluate`: for each prompt a layout that makes it true, rendered
    at ``size`` pixels (image ``seed_offset + i`` laid out with seed ``seed_offset + i``)."""
    everything = ShapesConfig(colours=tuple(COLOURS), holdout=())
    images = []
    for i, text in enumerate(prompts):
        prompt = parse_caption(text)
        objects = layout(np.random.default_rng(seed_offset + i), prompt, everything)
        images.append(render(Scene(objects, text, prompt.kind, prompt, texture, seed_offset + i), size))
    return images


def evaluate(
    generate_fn: Callable[[list[str], int], list[Image.Image]],
    suite: Sequence[EvalPrompt],
    samples_per_prompt: int = 4,
    batch_size: int = 32,
    progress: bool = True,
) -> EvalReport:
    """Generate ``samples_per_prompt`` images for every distinct text of ``suite`` and score them.

    ``generate_fn(prompts, seed_offset)`` returns one image per prompt; the run's images are numbered
    0, 1, ... (all texts for sample 0, then sample 1, ...) and image ``i`` of a call is number
    ``seed_offset + i``: seeding it with ``seed + seed_offset + i`` makes a run independent of ``batch_size``.
    """
    prompts = {e.text: e.prompt for e in suite}
    jobs = [(text, s) for s in range(samples_per_prompt) for text in prompts]
    starts = range(0, len(jobs), batch_size)
    starts = progress_bar(starts, desc="shapes eval", unit="batch", enabled=progress)
    scored = {}
    for start in starts:
        chunk = jobs[start : start + batch_size]
        images = generate_fn([text for text, _ in chunk], start)
        if len(images) != len(chunk):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(chunk)} prompts")
        for job, image in zip(chunk, images):
            detections = detect_objects(image)
            result = score(prompts[job[0]], detections)
            scored[job] = (result, [d.summary() for d in detections], None if result["correct"] else image)
    report = EvalReport([])
    for e in suite:
        for s in range(samples_per_prompt):
            result, detections, image = scored[e.text, s]
            ok = category_correct(e.category, result)
            record = {"text": e.text, "category": e.category, "sample": s, "correct": ok, "criteria": result}
            report.records.append(record | {"detections": detections})
            if not ok:
                report.failure_images.append(image)
    return report


def evaluate_pipeline(
    pipe,
    suite: Sequence[EvalPrompt] | None = None,
    samples_per_prompt: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    sampler: str | None = None,
    eta: float = 0.0,
    guide=None,
    guide_scale: float | None = None,
) -> EvalReport:
    """:func:`evaluate` a :class:`~cyclediffusion.Text2ImagePipeline` (image ``i`` seeded ``seed + i``)
    on ``suite`` (default :func:`build_suite`), sampling with ``sampler`` (default: the noise process's own),
    DDIM stochasticity ``eta`` (default 0: deterministic) and autoguidance by ``guide`` (default: the pipeline's own
    guide, if it has one) of weight ``guide_scale`` (default: the pipeline's; 0: none)."""
    import torch

    def generate_fn(prompts: list[str], seed_offset: int) -> list[Image.Image]:
        generators = [torch.Generator().manual_seed(seed + seed_offset + i) for i in range(len(prompts))]
        kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        if sampler is not None:
            kwargs["sampler"] = sampler
        if eta:
            kwargs["eta"] = eta
        if guide is not None:
            kwargs["guide"] = guide
        if guide_scale is not None:
            kwargs["guide_scale"] = guide_scale
        return pipe(prompts, generator=generators, output_type="pil", **kwargs).images

    return evaluate(generate_fn, build_suite() if suite is None else suite, samples_per_prompt, batch_size, progress)
