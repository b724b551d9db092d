"""The synthetic shapes world: determinism, captions that match the pixels, and the imagefolder writer."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cyclediffusion.data import (
    BACKGROUND,
    COLOURS,
    KINDS,
    POSITIONS,
    RELATIONS,
    SIZES,
    ShapesConfig,
    caption_for,
    converse,
    generate,
    parse_caption,
    prompt_suite,
    render,
    sample_scene,
    scene_rng,
    write_imagefolder,
)
from cyclediffusion.data.shapes import GAP, MARGIN, ensure_imagefolder, world_holdout
from cyclediffusion.eval import build_suite, training_holdout

CONFIG = ShapesConfig()
COLOUR_TOL = 50.0  # a pixel "is" a colour when within this RGB distance (about 2/3 covered or more)


def scenes(n: int, config: ShapesConfig = CONFIG, seed: int = 0):
    return [sample_scene(scene_rng(seed, i), config) for i in range(n)]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (k, 2) array of (row, col)."""
    seen = np.zeros_like(mask)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, pixels = True, [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        out.append(np.array(pixels))
    return out


def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    return np.linalg.norm(pixels - np.array(COLOURS[colour], dtype=float), axis=-1) < COLOUR_TOL


def test_same_seed_same_bytes_and_other_seed_differs():
    a = [(im.tobytes(), s.caption) for im, s in generate(40, CONFIG, seed=3)]
    b = [(im.tobytes(), s.caption) for im, s in generate(40, CONFIG, seed=3)]
    c = [(im.tobytes(), s.caption) for im, s in generate(40, CONFIG, seed=4)]
    assert a == b
    assert sum(x != y for x, y in zip(a, c)) >= 38


def test_prefix_of_a_bigger_set_is_the_smaller_set():
    small = [(im.tobytes(), s) for im, s in generate(10, CONFIG, seed=7)]
    big = [(im.tobytes(), s) for im, s in generate(30, CONFIG, seed=7)]
    assert small == big[:10]


def test_render_is_rgb_of_the_requested_size_and_antialiased():
    scene = sample_scene(scene_rng(0, 0), CONFIG)
    for size in (32, 64):
        image = render(scene, size)
        assert image.mode == "RGB" and image.size == (size, size)
    pixels = np.asarray(render(scene, 64), dtype=float)
    rgb = np.array(scene.objects[0].rgb, dtype=float)
    blend = (np.linalg.norm(pixels - rgb, axis=-1) > 20) & ~(np.abs(pixels - BACKGROUND).max(-1) < 40)
    assert blend.any()  # edge pixels are mixtures of object and background


def soft_alpha(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel coverage by ``colour``: the projection onto the background-to-colour line (0 off it)."""
    bg = np.array(BACKGROUND, dtype=float)
    d = np.array(COLOURS[colour], dtype=float) - bg
    alpha = np.clip((pixels - bg) @ d / (d @ d), 0, 1)
    off_line = np.linalg.norm(pixels - bg - alpha[..., None] * d, axis=-1) > 40
    return np.where(off_line, 0.0, alpha)


@pytest.mark.parametrize(
    "config",
    [CONFIG, replace(CONFIG, p_paraphrase=1.0), replace(CONFIG, kinds={"count": 1.0}, max_count=4)],
    ids=["plain", "paraphrased", "counts-to-four"],
)
def test_captions_match_pixels(config):
    """Colour at each centre, one colour component per object, shape/size/position/relations by geometry.

    Shape and size are read from the soft coverage around each object: its width and height are the sums of
    the column and row maxima, and area / (width * height) is 1 for a square, pi/4 for a circle, 1/2 for a
    triangle, which separates them cleanly even at 32 px.
    """
    size = config.size
    for image, scene in generate(300, config, seed=11):
        pixels = np.asarray(image, dtype=float)
        per_colour = Counter(o.colour for o in scene.objects)
        found = {c: components(colour_mask(pixels, c)) for c in per_colour}
        for colour, count in per_colour.items():
            assert len(found[colour]) == count, (scene.caption, colour, len(found[colour]))
        for obj in scene.objects:
            row, col = int(obj.y * size), int(obj.x * size)
            assert np.linalg.norm(pixels[row, col] - obj.rgb) < 5, (scene.caption, obj)
            comp = next(p for p in found[obj.colour] if (p == (row, col)).all(1).any())
            (r0, c0), (r1, c1) = comp.min(0) - 1, comp.max(0) + 2
            alpha = soft_alpha(pixels, obj.colour)[max(r0, 0) : r1, max(c0, 0) : c1]
            width, height = alpha.max(0).sum(), alpha.max(1).sum()
            fill = alpha.sum() / (width * height)
            shape = "square" if fill > 0.92 else "circle" if fill > 0.7 else "triangle"
            assert shape == obj.shape, (scene.caption, obj, fill)
            assert (width > 0.37 * size) == (obj.size == "large"), (scene.caption, obj, width)
        prompt = scene.prompt
        if prompt.position:
            (obj,) = scene.objects
            nearest = min(POSITIONS, key=lambda k: np.hypot(obj.x - POSITIONS[k][0], obj.y - POSITIONS[k][1]))
            assert nearest == prompt.position
        if prompt.kind == "relation":
            a, b = (found[o.colour][0] for o in scene.objects)
            axis = 0 if prompt.relation in ("above", "below") else 1  # rows for above/below, columns else
            if prompt.relation in ("below", "to the right of"):
                a, b = b, a
            assert a[:, axis].max() < b[:, axis].min(), scene.caption
        # everything away from the objects is the grey background
        covered = np.zeros((size, size), dtype=bool)
        for obj in scene.objects:
            r = obj.radius + 1.5 / size
            ys, xs = np.ogrid[:size, :size]
            covered |= (np.abs((xs + 0.5) / size - obj.x) <= r) & (np.abs((ys + 0.5) / size - obj.y) <= r)
        rest = pixels[~covered]
        assert np.abs(rest - BACKGROUND).max() < 35 and np.ptp(rest, axis=-1).max() <= 1


def test_paraphrase_says_the_same_picture_the_other_way_round():
    plain, turned = generate(200, CONFIG, seed=5), generate(200, replace(CONFIG, p_paraphrase=1.0), seed=5)
    said = Counter()
    for (image_a, a), (image_b, b) in zip(plain, turned):
        assert image_a.tobytes() == image_b.tobytes()  # the option changes words, never pixels
        if a.kind in ("pair", "relation"):
            assert b.prompt == converse(a.prompt) and b.objects == a.objects[::-1]
            assert parse_caption(b.caption) == b.prompt and b.caption != a.caption
            said[b.prompt.relation] += 1
        else:
            assert b == a
    assert said[None] and all(said[r] for r in RELATIONS)
    turned = converse(parse_caption("a red circle above a blue square"))
    assert caption_for(turned) == "a blue square below a red circle"
    with pytest.raises(ValueError, match="p_paraphrase"):
        ShapesConfig(p_paraphrase=1.5)


@pytest.mark.parametrize(
    "config", [CONFIG, replace(CONFIG, kinds={"count": 1.0}, max_count=4)], ids=["default", "counts-to-four"]
)
def test_objects_stay_inside_and_apart(config):
    drawn = scenes(2000, config)
    assert {s.prompt.count for s in drawn if s.kind == "count"} == set(range(1, config.max_count + 1))
    for scene in drawn:
        assert len(scene.objects) == (scene.prompt.count if scene.kind == "count" else len(scene.prompt.colours))
        for obj in scene.objects:
            r = SIZES[obj.size]
            for c in (obj.x, obj.y):
                assert c - r >= MARGIN - 1e-9 and c + r <= 1 - MARGIN + 1e-9
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                d = a.radius + b.radius + GAP - 1e-9
                assert abs(a.x - b.x) >= d or abs(a.y - b.y) >= d, scene


def test_held_out_combination_never_appears():
    config = ShapesConfig(holdout=("purple triangle",))
    for scene in scenes(2000, config):
        assert "purple triangle" not in scene.caption
        assert not any(o.colour == "purple" and o.shape == "triangle" for o in scene.objects)
    assert any("purple" in s.caption for s in scenes(200, config))


def test_grammar_covers_every_kind_and_word():
    drawn = scenes(2000)
    kinds = Counter(s.kind for s in drawn)
    assert set(kinds) == set(KINDS)
    assert abs(kinds["single"] / 2000 - KINDS["single"]) < 0.05
    prompts = [s.prompt for s in drawn]
    assert {p.relation for p in prompts if p.kind == "relation"} == set(RELATIONS)
    assert {p.position for p in prompts if p.kind == "single"} == {*POSITIONS, None}
    assert {p.size for p in prompts if p.kind == "single"} == {*SIZES, None}
    assert {p.count for p in prompts if p.kind == "count"} == {1, 2, 3}
    assert {o.colour for s in drawn for o in s.objects} == set(CONFIG.colours)
    assert {o.size for s in drawn if s.kind != "single" for o in s.objects} == set(SIZES)
    for s in drawn:
        assert s.caption == caption_for(s) == caption_for(s.prompt)
        assert parse_caption(s.caption) == s.prompt
        if s.kind in ("pair", "relation"):
            assert s.prompt.colours[0] != s.prompt.colours[1]


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle",
        "a small blue square on the left",
        "a large green triangle at the top",
        "one white square",
        "two yellow circles",
        "three red squares",
        "four blue triangles",
        "a red circle and a blue square",
        "a blue square above a green triangle",
        "a red circle to the left of a yellow square",
    ],
)
def test_example_captions_round_trip(caption):
    assert caption_for(parse_caption(caption)) == caption


@pytest.mark.parametrize(
    "caption", ["a red dog", "five red circles", "two red circle", "a red circle near a blue square", ""]
)
def test_parse_caption_rejects_other_text(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_config_validation():
    with pytest.raises(ValueError):
        ShapesConfig(colours=("red", "mauve"))
    with pytest.raises(ValueError):
        ShapesConfig(holdout=("purple hexagon",))
    with pytest.raises(ValueError):
        ShapesConfig(kinds={"single": 0.0})
    with pytest.raises(ValueError, match="max_count"):
        ShapesConfig(max_count=5)


def test_prompt_suite_is_fixed_and_covers_every_kind():
    suite = prompt_suite(CONFIG, per_kind=20)
    assert suite == prompt_suite(CONFIG, per_kind=20)
    captions = [caption_for(p) for p in suite]
    assert len(set(captions)) == len(captions)
    assert Counter(p.kind for p in suite) == {
        "single": len(CONFIG.combos()),
        "count": 20,
        "pair": 20,
        "relation": 20,
    }
    held = prompt_suite(replace(CONFIG, holdout=("purple triangle",)), per_kind=20)
    assert not any("purple triangle" in caption_for(p) for p in held)


def test_write_imagefolder(tmp_path):
    n = 120
    out = write_imagefolder(tmp_path / "shapes", n, CONFIG, seed=5)
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(n)]
    assert not list(out.glob("*.tmp"))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == n
    for row, (image, scene) in zip(rows, generate(n, CONFIG, seed=5)):
        assert set(row) == {"file_name", "text", "kind", "objects"}
        assert (out / row["file_name"]).is_file()
        assert row["text"] == scene.caption and row["kind"] == scene.kind
        assert [(o["shape"], o["colour"], o["size"]) for o in row["objects"]] == [
            (o.shape, o.colour, o.size) for o in scene.objects
        ]
        with Image.open(out / row["file_name"]) as saved:
            assert saved.mode == "RGB" and saved.tobytes() == image.tobytes()

    with pytest.raises(FileExistsError):
        write_imagefolder(out, 10, CONFIG, seed=5)
    write_imagefolder(out, 10, CONFIG, seed=5, overwrite=True)
    assert len(list(out.glob("*.png"))) == 10
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 10


def test_the_folder_records_its_world_and_eval_defaults_to_its_held_out_pairs(tmp_path):
    config = replace(CONFIG, holdout=("purple triangle",))
    data = tmp_path / "shapes"
    assert ensure_imagefolder(data, 12, config, seed=3)  # written
    assert world_holdout(data) == ("purple triangle",)
    stamp = json.loads((data / "world.json").read_text())
    assert (stamp["n"], stamp["seed"], stamp["holdout"]) == (12, 3, ["purple triangle"])
    first = (data / "metadata.jsonl").read_text()
    assert not ensure_imagefolder(data, 12, config, seed=3)  # the same world: kept
    assert ensure_imagefolder(data, 12, config, seed=4)  # another seed: rewritten
    assert (data / "metadata.jsonl").read_text() != first and json.loads((data / "world.json").read_text())["seed"] == 4
    assert world_holdout(tmp_path) is None  # a folder without a world.json
    # a run trained on it: eval builds its held-out category from the run's options.yaml -> data -> world.json
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "options.yaml").write_text(f"data:\n  data: {data}\n  image_size: 32\n")
    assert training_holdout(run / "model") == ("purple triangle",)
    (run / "options.yaml").write_text("data:\n  data: elsewhere\n")
    assert training_holdout(run / "model") == ()
    assert training_holdout(tmp_path / "loose" / "model") == ()
    suite = build_suite(per_kind=2, held_out=training_holdout(run / "model") or ("purple triangle",))
    assert {e.text for e in suite if e.category == "held_out"} and not any(
        "purple triangle" in e.text for e in suite if e.category != "held_out"
    )


def test_write_imagefolder_workers_and_speed(tmp_path):
    n = 2000
    start = time.perf_counter()
    one = write_imagefolder(tmp_path / "one", n, CONFIG, seed=1)
    seconds = time.perf_counter() - start
    print(f"write_imagefolder: {n} images of {CONFIG.size} px in {seconds:.2f} s ({n / seconds:.0f} images/s)")
    two = write_imagefolder(tmp_path / "two", 300, CONFIG, seed=1, num_workers=2)
    assert (two / "metadata.jsonl").read_text().splitlines() == (one / "metadata.jsonl").read_text().splitlines()[:300]
    for i in range(0, 300, 37):
        assert (two / f"{i:05d}.png").read_bytes() == (one / f"{i:05d}.png").read_bytes()


def test_data_command_draws_the_world_it_is_told(tmp_path, capsys):
    from cyclediffusion.cli import main

    out = tmp_path / "counts"
    argv = ["data", "shapes", "--out", str(out), "--n", "60", "--kinds", "count=1", "--max-count", "4"]
    assert main([*argv, "--texture", "0"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"count"}
    assert {len(r["objects"]) for r in rows} == {1, 2, 3, 4}
    assert all(r["text"].startswith("four ") for r in rows if len(r["objects"]) == 4)
    assert main([*argv[:-1], "5", "--out", str(tmp_path / "bad")]) == 2
    assert "max_count" in capsys.readouterr().err
