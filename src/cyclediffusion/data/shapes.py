"""The built-in synthetic world: captioned scenes of one to three coloured shapes on a dark grey background.

A scene is drawn in three steps: :func:`sample_prompt` picks what the caption says (a :class:`Prompt`),
:func:`layout` places objects that make it true, and :func:`render` paints them. Everything is chosen so
that a scorer can judge an image exactly: object colours are far apart in RGB and none is grey, every
shape fills its square bounding box by a distinct fraction (square 1, circle pi/4, triangle 1/2), sizes
are two box widths, positions are five anchors, and objects never touch (their boxes are ``GAP`` apart).
Coordinates are fractions of the image side, ``(0, 0)`` the top-left corner; an object's ``x, y`` is the
centre of its bounding box and ``radius`` half the box side.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..progress import progress

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (180, 50, 210),
    "white": (240, 240, 240),
    "orange": (245, 140, 20),
    "cyan": (40, 210, 220),
}
DEFAULT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
BACKGROUND: tuple[int, int, int] = (44, 44, 44)
SIZES: dict[str, float] = {"small": 0.15, "large": 0.22}  # half the side of the bounding box
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
CONVERSE: dict[str, str] = {"above": "below", "below": "above", "to the left of": "to the right of"}
CONVERSE["to the right of"] = "to the left of"
KINDS: dict[str, float] = {"single": 0.5, "count": 0.15, "pair": 0.2, "relation": 0.15}
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
MARGIN = 0.02  # least distance from a bounding box to the image border
GAP = 0.05  # least distance between two bounding boxes (along x or y)
JITTER = 0.04  # how far an object may move from its position anchor
RELATION_BAND = 0.12  # in a relation, the other axis stays within this of the middle
MAX_TRIES = 500  # layouts tried before objects fall back to the smallest size
WORLD_NAME = "world.json"  # beside metadata.jsonl: the ShapesConfig, n and seed that drew the folder


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; ``x, y`` is the centre of its bounding box in [0, 1] image coordinates."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        """Half the side of the square bounding box, as a fraction of the image side."""
        return SIZES[self.size]

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclass(frozen=True)
class Prompt:
    """What a caption says. ``colours``/``shapes`` name one object (single, count) or two (pair, relation).

    ``size`` and ``position`` are set only where the caption names them (single); ``count`` is the number
    of identical objects (count); ``relation`` is one of :data:`RELATIONS` (relation).
    """

    kind: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    count: int = 1
    size: str | None = None
    position: str | None = None
    relation: str | None = None


@dataclass(frozen=True)
class Scene:
    """Objects (in caption order), their exact caption, and the template ``kind`` that made it."""

    objects: tuple[ShapeObject, ...]
    caption: str
    kind: str
    prompt: Prompt
    texture: float = 0.0
    background_seed: int = 0


@dataclass
class ShapesConfig:
    """What the generator draws: image side, kind weights, vocabulary, held-out colour-shape pairs."""

    size: int = 32
    kinds: dict[str, float] = field(default_factory=lambda: dict(KINDS))
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = DEFAULT_COLOURS
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)
    relations: tuple[str, ...] = RELATIONS
    max_count: int = 3
    p_size: float = 0.5  # chance that a single object's caption names its size
    p_position: float = 0.5  # ... and its position
    p_paraphrase: float = 0.0  # chance that a pair or relation is said the other way round ("B right of A")
    holdout: tuple[str, ...] = ()  # e.g. ("purple triangle",): never drawn
    texture: float = 6.0  # std of the smooth grey background noise, in 0-255 units (0: plain)

    def __post_init__(self) -> None:
        for name, values, vocab in [
            ("kinds", self.kinds, KINDS),
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, COLOURS),
            ("sizes", self.sizes, SIZES),
            ("positions", self.positions, POSITIONS),
            ("relations", self.relations, RELATIONS),
        ]:
            unknown = [v for v in values if v not in vocab]
            if unknown or not values:
                raise ValueError(f"ShapesConfig.{name}: {unknown or 'empty'}; choose from {list(vocab)}")
        for name in ("p_size", "p_position", "p_paraphrase"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ShapesConfig.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not any(w > 0 for w in self.kinds.values()):
            raise ValueError("ShapesConfig.kinds needs a positive weight")
        if not 1 <= self.max_count <= len(NUMBERS):
            raise ValueError(f"ShapesConfig.max_count must be in 1..{len(NUMBERS)}")
        every = {f"{c} {s}" for c in COLOURS for s in SHAPES}
        if any(h not in every for h in self.holdout):
            raise ValueError(f"ShapesConfig.holdout entries must look like 'purple triangle': {self.holdout}")
        if not self.combos():
            raise ValueError("ShapesConfig.holdout leaves no colour-shape pair to draw")

    def combos(self) -> list[tuple[str, str]]:
        """The (colour, shape) pairs that may be drawn: all of them but the held-out ones."""
        return [(c, s) for c in self.colours for s in self.shapes if f"{c} {s}" not in self.holdout]


def _plural(shape: str) -> str:
    return shape + "s"


def caption_for(prompt: Prompt | Scene) -> str:
    """The one caption of a prompt (or scene), e.g. ``"a small blue square on the left"``."""
    p = prompt.prompt if isinstance(prompt, Scene) else prompt
    first = f"a {p.colours[0]} {p.shapes[0]}"
    if p.kind == "single":
        size = f"{p.size} " if p.size else ""
        where = f" {POSITION_PHRASES[p.position]}" if p.position else ""
        return f"a {size}{p.colours[0]} {p.shapes[0]}{where}"
    if p.kind == "count":
        noun = p.shapes[0] if p.count == 1 else _plural(p.shapes[0])
        return f"{NUMBERS[p.count - 1]} {p.colours[0]} {noun}"
    second = f"a {p.colours[1]} {p.shapes[1]}"
    if p.kind == "pair":
        return f"{first} and {second}"
    if p.kind == "relation":
        return f"{first} {p.relation} {second}"
    raise ValueError(f"unknown kind {p.kind!r}")


def parse_caption(text: str) -> Prompt:
    """Inverse of :func:`caption_for` over the whole vocabulary; ``ValueError`` outside the grammar."""
    words = text.strip().lower().split()
    phrase = " ".join(words)

    def obj(ws: list[str]) -> tuple[str, str]:
        if len(ws) != 3 or ws[0] != "a" or ws[1] not in COLOURS or ws[2] not in SHAPES:
            raise ValueError(f"not a caption of the shapes world: {text!r}")
        return ws[1], ws[2]

    for rel in (" and ", *(f" {r} " for r in RELATIONS)):
        if rel in phrase:
            left, right = phrase.split(rel, 1)
            (c1, s1), (c2, s2) = obj(left.split()), obj(right.split())
            kind, relation = ("pair", None) if rel == " and " else ("relation", rel.strip())
            return Prompt(kind, (c1, c2), (s1, s2), relation=relation)
    if words and words[0] in NUMBERS and len(words) == 3 and words[1] in COLOURS:
        count, noun = NUMBERS.index(words[0]) + 1, words[2]
        shape = noun if count == 1 else noun[:-1]
        if shape in SHAPES and noun == (shape if count == 1 else _plural(shape)):
            return Prompt("count", (words[1],), (shape,), count=count)
    position = next((k for k, v in POSITION_PHRASES.items() if phrase.endswith(" " + v)), None)
    if position:
        words = words[: -len(POSITION_PHRASES[position].split())]
    size = words.pop(1) if len(words) == 4 and words[1] in SIZES else None
    colour, shape = obj(words)
    return Prompt("single", (colour,), (shape,), size=size, position=position)


def _pick(rng: np.random.Generator, seq: tuple | list):
    return seq[int(rng.random() * len(seq))]  # rng.integers is ten times slower per call


def sample_prompt(rng: np.random.Generator, config: ShapesConfig) -> Prompt:
    """Draw a caption's content: the kind by ``config.kinds`` weight, then its words (holdout excluded)."""
    names = [k for k, w in config.kinds.items() if w > 0]
    bounds = np.cumsum([config.kinds[k] for k in names])
    kind = names[min(int(np.searchsorted(bounds, rng.random() * bounds[-1], side="right")), len(names) - 1)]
    combos = config.combos()
    if kind in ("single", "count"):
        colour, shape = _pick(rng, combos)
        if kind == "count":
            return Prompt(kind, (colour,), (shape,), count=1 + int(rng.random() * config.max_count))
        size = _pick(rng, config.sizes) if rng.random() < config.p_size else None
        position = _pick(rng, config.positions) if rng.random() < config.p_position else None
        return Prompt(kind, (colour,), (shape,), size=size, position=position)
    for _ in range(MAX_TRIES):  # two objects of different colours (and, for a pair, different shapes)
        (c1, s1), (c2, s2) = _pick(rng, combos), _pick(rng, combos)
        if c1 != c2 and (kind == "relation" or s1 != s2):
            relation = _pick(rng, config.relations) if kind == "relation" else None
            return Prompt(kind, (c1, c2), (s1, s2), relation=relation)
    raise ValueError(f"ShapesConfig allows no two distinct objects for kind {kind!r}")


def converse(prompt: Prompt) -> Prompt:
    """The same two-object scene named in the other order: "a red circle left of a blue square" becomes
    "a blue square to the right of a red circle", "A and B" becomes "B and A"."""
    if prompt.kind not in ("pair", "relation"):
        raise ValueError(f"only pairs and relations have a converse, not {prompt.kind!r}")
    relation = CONVERSE[prompt.relation] if prompt.relation else None
    return replace(prompt, colours=prompt.colours[::-1], shapes=prompt.shapes[::-1], relation=relation)


def binding_words() -> frozenset[str]:
    """The words that decide what a caption binds: colours, shapes (and plurals), numbers, relation words."""
    relation_words = {w for r in RELATIONS for w in r.split() if w not in ("to", "the", "of")}
    return frozenset({*COLOURS, *SHAPES, *map(_plural, SHAPES), *NUMBERS, *relation_words})


OPPOSITE_RELATION: dict[str, str] = {
    "above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of",
}  # fmt: skip
NEGATIVE_SWAPS: tuple[str, ...] = ("colours", "relation")


def negative_caption(text: str, swap: str = "colours") -> str | None:
    """A caption of the same form that the picture of ``text`` makes false; None outside the shapes grammar.

    ``swap="colours"``: two objects with their colours swapped, one object (or a count) in the next colour of
    the vocabulary. ``swap="relation"``: a relation caption with the opposite relation (None for other kinds).
    """
    if swap not in NEGATIVE_SWAPS:
        raise ValueError(f"unknown negative swap {swap!r}; choose from {', '.join(NEGATIVE_SWAPS)}")
    try:
        prompt = parse_caption(text)
    except ValueError:
        return None
    if swap == "relation":
        if prompt.kind != "relation":
            return None
        return caption_for(replace(prompt, relation=OPPOSITE_RELATION[prompt.relation]))
    if prompt.kind in ("pair", "relation"):
        return caption_for(replace(prompt, colours=prompt.colours[::-1]))
    names = list(COLOURS)
    other = names[(names.index(prompt.colours[0]) + 1) % len(names)]
    return caption_for(replace(prompt, colours=(other,)))


def _span(r: float) -> tuple[float, float]:
    return r + MARGIN, 1.0 - r - MARGIN


def _relation_xy(rng: np.random.Generator, ra: float, rb: float, relation: str) -> list[tuple[float, float]]:
    """Centres of a and b with a's box wholly on the named side of b's; [] if they cannot fit."""
    a_first = relation in ("above", "to the left of")  # a has the smaller coordinate along the axis
    r1, r2 = (ra, rb) if a_first else (rb, ra)
    d = ra + rb + GAP
    (lo1, hi1), (lo2, hi2) = _span(r1), _span(r2)
    if lo1 + d > hi2:
        return []
    u = rng.uniform(lo1, min(hi1, hi2 - d))
    v = rng.uniform(max(lo2, u + d), hi2)
    along = (u, v) if a_first else (v, u)
    across = [float(np.clip(0.5 + rng.uniform(-RELATION_BAND, RELATION_BAND), *_span(r))) for r in (ra, rb)]
    if relation in ("above", "below"):
        return [(across[0], along[0]), (across[1], along[1])]
    return [(along[0], across[0]), (along[1], across[1])]


def _scatter(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]]:
    """Uniform centres for boxes of ``radii``, pairwise ``GAP`` apart (rejection over ``MAX_TRIES``
    whole layouts drawn at once); [] when none fits."""
    r = np.array(radii)[None, :, None]
    xy = (r + MARGIN) + (1 - 2 * (r + MARGIN)) * rng.random((MAX_TRIES, len(radii), 2))
    ok = np.ones(MAX_TRIES, dtype=bool)
    for i in range(len(radii)):
        for j in range(i):
            ok &= np.abs(xy[:, i] - xy[:, j]).max(axis=1) >= radii[i] + radii[j] + GAP
    if ok.any():
        return [(float(x), float(y)) for x, y in xy[int(ok.argmax())]]
    return _grid(rng, radii)


def _grid(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]]:
    """Centres in distinct cells of a 2 x 2 grid, each moved at random as far as its cell allows: four boxes
    that uniform rejection almost never places; [] for more than four boxes or boxes too large for the cells."""
    slack = 0.25 - max(radii) - max(GAP / 2, MARGIN)
    if len(radii) > 4 or slack < 0:
        return []
    cells = rng.permutation(4)[: len(radii)]
    anchors = np.array([(0.25 + 0.5 * (c % 2), 0.25 + 0.5 * (c // 2)) for c in cells])
    xy = anchors + rng.uniform(-slack, slack, anchors.shape)
    return [(float(x), float(y)) for x, y in xy]


def layout(rng: np.random.Generator, prompt: Prompt, config: ShapesConfig) -> tuple[ShapeObject, ...]:
    """Place objects that make ``prompt`` true: inside the image, boxes ``GAP`` apart, in caption order.

    Unnamed sizes are drawn at random (three counted objects are always the smallest size); when the
    drawn sizes cannot be placed, the objects fall back to the smallest size.
    """
    specs = list(zip(prompt.colours, prompt.shapes)) * (prompt.count if prompt.kind == "count" else 1)
    smallest = min(config.sizes, key=SIZES.__getitem__)
    if prompt.size:
        sizes = [prompt.size]
    elif prompt.kind == "count":  # identical objects; three large ones hardly fit
        sizes = [_pick(rng, config.sizes) if prompt.count < 3 else smallest] * len(specs)
    else:
        sizes = [_pick(rng, config.sizes) for _ in specs]
    for attempt in (sizes, [smallest] * len(specs)):
        radii = [SIZES[s] for s in attempt]
        if prompt.position:
            (cx, cy), span = POSITIONS[prompt.position], _span(radii[0])
            centres = [tuple(float(np.clip(c + rng.uniform(-JITTER, JITTER), *span)) for c in (cx, cy))]
        elif prompt.kind == "relation":
            centres = _relation_xy(rng, radii[0], radii[1], prompt.relation or "")
        else:
            centres = _scatter(rng, radii)
        if centres:
            return tuple(ShapeObject(s, c, z, x, y) for (c, s), z, (x, y) in zip(specs, attempt, centres))
    raise RuntimeError(f"could not place {caption_for(prompt)!r} in {MAX_TRIES} tries")


def sample_scene(rng: np.random.Generator, config: ShapesConfig) -> Scene:
    """Draw one scene: a prompt, a layout that makes it true, and a background seed. With ``p_paraphrase``, a
    pair or relation may then be said the other way round (:func:`converse`) of the same picture."""
    prompt = sample_prompt(rng, config)
    objects = layout(rng, prompt, config)
    seed = int(rng.random() * 2**31)
    if config.p_paraphrase > 0 and prompt.kind in ("pair", "relation") and rng.random() < config.p_paraphrase:
        prompt, objects = converse(prompt), objects[::-1]
    return Scene(objects, caption_for(prompt), prompt.kind, prompt, config.texture, seed)


def _coverage(obj: ShapeObject, size: int, supersample: int) -> tuple[slice, slice, np.ndarray]:
    """Rows, columns and the fraction of each of their pixels inside ``obj`` (``supersample**2`` samples)."""
    r = obj.radius
    (y0, y1), (x0, x1) = ((max(0, int((c - r) * size)), min(size, int((c + r) * size) + 1)) for c in (obj.y, obj.x))
    ty = (np.arange(y0 * supersample, y1 * supersample) + 0.5) / (size * supersample)
    tx = (np.arange(x0 * supersample, x1 * supersample) + 0.5) / (size * supersample)
    dx, dy = tx[None, :] - obj.x, ty[:, None] - obj.y
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif obj.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif obj.shape == "triangle":  # apex at the top middle, base along the bottom of the box
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    alpha = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    return slice(y0, y1), slice(x0, x1), alpha[..., None]


def render(scene: Scene, size: int, supersample: int = 4) -> Image.Image:
    """Paint ``scene`` as a ``size`` x ``size`` RGB image, antialiased by supersampling (deterministic)."""
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    if scene.texture > 0:  # smooth grey noise: a 4x4 grid of normals upsampled bicubically
        grid = np.random.default_rng(scene.background_seed).standard_normal((4, 4)).astype(np.float32)
        noise = Image.fromarray(grid * scene.texture).resize((size, size), Image.Resampling.BICUBIC)
        canvas += np.asarray(noise)[..., None]
    for obj in scene.objects:
        rows, cols, alpha = _coverage(obj, size, supersample)
        canvas[rows, cols] = canvas[rows, cols] * (1 - alpha) + np.asarray(obj.rgb, dtype=np.float64) * alpha
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of item ``index`` of the set made with ``seed`` (independent of the set's size)."""
    return np.random.default_rng([seed, index])


def generate(n: int, config: ShapesConfig | None = None, seed: int = 0) -> Iterator[tuple[Image.Image, Scene]]:
    """Yield ``n`` (image, scene) pairs; item ``i`` depends only on ``(config, seed, i)``."""
    config = config or ShapesConfig()
    for i in range(n):
        scene = sample_scene(scene_rng(seed, i), config)
        yield render(scene, config.size), scene


def scene_record(scene: Scene) -> dict:
    """The JSON-ready description of a scene written to ``metadata.jsonl`` (without ``file_name``)."""
    objects = [
        {"shape": o.shape, "colour": o.colour, "size": o.size, "x": round(o.x, 4), "y": round(o.y, 4)}
        for o in scene.objects
    ]
    return {"text": scene.caption, "kind": scene.kind, "objects": objects}


def _write_one(job: tuple[Path, str, ShapesConfig, int, int]) -> str:
    out_dir, name, config, seed, index = job
    scene = sample_scene(scene_rng(seed, index), config)
    png = io.BytesIO()  # encoding in memory and writing once is several times faster than save(path)
    render(scene, config.size).save(png, format="PNG")
    (out_dir / name).write_bytes(png.getvalue())
    return json.dumps({"file_name": name, **scene_record(scene)})


def write_imagefolder(
    out_dir: str | Path,
    n: int,
    config: ShapesConfig | None = None,
    seed: int = 0,
    num_workers: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` scenes as a Hugging Face ``imagefolder``: ``00000.png ...`` and ``metadata.jsonl``.

    Rows of ``metadata.jsonl`` are ``{"file_name", "text", "kind", "objects"}``; the file is written under
    a temporary name and renamed at the end, so a crash never leaves a partial one. ``world.json`` records what
    drew it (``n``, ``seed`` and the config, its held-out pairs included: :func:`world_holdout`). A folder that is not
    empty is refused unless ``overwrite``, which first deletes its ``metadata.jsonl`` and numbered PNGs.
    Returns ``out_dir``; load it with ``datasets.load_dataset("imagefolder", data_dir=out_dir)``.
    """
    config = config or ShapesConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = out_dir / "metadata.jsonl"
    if any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty (pass overwrite=True to replace a shapes dataset)")
        for old in out_dir.iterdir():
            if old.name in ("metadata.jsonl", "metadata.jsonl.tmp", WORLD_NAME) or re.fullmatch(
                r"\d{5,}\.png", old.name
            ):
                old.unlink()
    width = max(5, len(str(n - 1)))
    jobs = ((out_dir, f"{i:0{width}d}.png", config, seed, i) for i in range(n))
    tmp = out_dir / "metadata.jsonl.tmp"
    with tmp.open("w") as f:
        if num_workers > 1:
            import multiprocessing

            with multiprocessing.get_context().Pool(num_workers) as pool:
                for line in progress(pool.imap(_write_one, jobs, chunksize=256), total=n, desc="shapes"):
                    f.write(line + "\n")
        else:
            for line in progress(map(_write_one, jobs), total=n, desc="shapes"):
                f.write(line + "\n")
    os.replace(tmp, meta)
    (out_dir / WORLD_NAME).write_text(json.dumps(world_record(n, config, seed)))
    return out_dir


def ensure_imagefolder(out_dir: str | Path, n: int, config: ShapesConfig, seed: int = 0, num_workers: int = 1) -> bool:
    """:func:`write_imagefolder` unless ``out_dir`` already holds exactly that world (its ``world.json``, written last,
    says so); returns whether it wrote."""
    stamp = Path(out_dir) / WORLD_NAME
    written = (Path(out_dir) / "metadata.jsonl").is_file() and stamp.is_file()
    if written and json.loads(stamp.read_text()) == world_record(n, config, seed):
        return False
    stamp.unlink(missing_ok=True)
    write_imagefolder(out_dir, n, config, seed=seed, num_workers=num_workers, overwrite=True)
    return True


def world_record(n: int, config: ShapesConfig, seed: int) -> dict:
    """What :func:`write_imagefolder` writes to ``world.json``, in JSON-normal form (lists, not tuples)."""
    return json.loads(json.dumps({"n": n, "seed": seed, **asdict(config)}))


def world_holdout(data_dir: str | Path) -> tuple[str, ...] | None:
    """The colour-shape pairs a shapes folder never draws (its ``world.json``), or None for a folder without one."""
    stamp = Path(data_dir) / WORLD_NAME
    return tuple(json.loads(stamp.read_text()).get("holdout", ())) if stamp.is_file() else None


def prompt_suite(config: ShapesConfig | None = None, per_kind: int = 50, seed: int = 0) -> list[Prompt]:
    """A fixed benchmark: every allowed colour-shape as a bare single object, then up to ``per_kind``
    distinct prompts of each other kind that ``config`` draws (deterministic in ``seed``)."""
    config = config or ShapesConfig()
    suite = [Prompt("single", (c,), (s,)) for c, s in config.combos()]
    for k, kind in enumerate(("count", "pair", "relation")):
        if config.kinds.get(kind, 0) <= 0:
            continue
        rng, only = np.random.default_rng([seed, k]), replace(config, kinds={kind: 1.0})
        found: dict[str, Prompt] = {}
        for _ in range(per_kind * 20):
            found.setdefault(caption_for(p := sample_prompt(rng, only)), p)
            if len(found) == per_kind:
                break
        suite += found.values()
    return suite
