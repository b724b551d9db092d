"""ShapesEval: the scorer reads ground-truth renders back exactly, calls wrong images wrong in the right
criterion, survives blur and noise, and the suite / evaluate / report plumbing is complete and deterministic."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cyclediffusion.data import (
    BACKGROUND,
    COLOURS,
    Prompt,
    Scene,
    ShapeObject,
    ShapesConfig,
    generate,
    parse_caption,
    render,
)
from cyclediffusion.eval import (
    CATEGORIES,
    build_suite,
    detect_objects,
    evaluate,
    evaluate_pipeline,
    nearest_position,
    score,
)
from cyclediffusion.eval import (
    ground_truth as perfect_model,
)

ALL_COLOURS = ShapesConfig(colours=tuple(COLOURS))


def draw(*objects: ShapeObject, size: int = 32) -> Image.Image:
    """Render hand-placed objects on the plain background."""
    prompt = Prompt("single", (objects[0].colour,), (objects[0].shape,)) if objects else Prompt("single", (), ())
    return render(Scene(tuple(objects), "", "single", prompt), size)


def degrade(image: Image.Image, rng: np.random.Generator, blur: float = 0.7, noise: float = 8.0) -> Image.Image:
    """Gaussian blur of ``blur`` px, then Gaussian noise of std ``noise`` (0-255 units)."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    pixels = pixels + rng.normal(0.0, noise, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def agrees(scene: Scene, detections) -> bool:
    """Same objects (colour, shape, size), each centre within 0.04 of the side of a detection of its kind."""
    if Counter((d.colour, d.shape, d.size) for d in detections) != Counter(
        (o.colour, o.shape, o.size) for o in scene.objects
    ):
        return False
    return all(
        any(
            (d.colour, d.shape) == (o.colour, o.shape) and abs(d.x - o.x) < 0.04 and abs(d.y - o.y) < 0.04
            for d in detections
        )
        for o in scene.objects
    )


def run(images_and_scenes, label: str) -> tuple[float, float]:
    """Share of images whose detections agree with the scene, and share scored correct; prints failures."""
    n = agree = correct = 0
    failures: Counter = Counter()
    for image, scene in images_and_scenes:
        detections = detect_objects(image)
        result = score(scene.prompt, detections)
        n, agree, correct = n + 1, agree + agrees(scene, detections), correct + result["correct"]
        if not result["correct"]:
            failures[scene.kind, tuple(k for k, ok in result.items() if not ok and k != "correct")] += 1
    print(f"{label}: {n} images, agreement {agree / n:.4f}, correct {correct / n:.4f}, failures {dict(failures)}")
    return agree / n, correct / n


@pytest.mark.parametrize(
    ("config", "n", "seed"),
    [
        (ALL_COLOURS, 1000, 21),  # every kind and all 8 colours, default background texture
        (ShapesConfig(texture=0.0), 200, 22),  # plain background
        (ShapesConfig(size=64, colours=tuple(COLOURS)), 100, 23),  # another resolution
    ],
    ids=["32px-textured", "32px-plain", "64px"],
)
def test_scorer_agrees_with_ground_truth(config, n, seed):
    agreement, accuracy = run(generate(n, config, seed=seed), f"ground truth {config.size}px texture={config.texture}")
    assert agreement >= 0.99 and accuracy >= 0.99


def test_scorer_survives_blur_and_noise():
    rng = np.random.default_rng(0)
    noisy = ((degrade(image, rng), scene) for image, scene in generate(300, ALL_COLOURS, seed=31))
    _, accuracy = run(noisy, "blur 0.7 px + noise 8/255")
    assert accuracy >= 0.95


def test_wrong_images_fail_the_right_criterion():
    red_square = ShapeObject("square", "red", "large", 0.5, 0.5)
    result = score(parse_caption("a blue square"), detect_objects(draw(red_square)))
    assert not result["colour"] and result["shape"] and result["number"] and not result["correct"]

    two = [ShapeObject("circle", "red", "small", x, 0.5) for x in (0.25, 0.75)]
    result = score(parse_caption("three red circles"), detect_objects(draw(*two)))
    assert not result["number"] and result["colour"] and result["shape"] and not result["correct"]
    assert score(parse_caption("two red circles"), detect_objects(draw(*two)))["correct"]

    relation = parse_caption("a red circle to the left of a blue square")
    left, right = ShapeObject("circle", "red", "small", 0.25, 0.5), ShapeObject("square", "blue", "small", 0.75, 0.5)
    assert score(relation, detect_objects(draw(left, right)))["correct"]
    swapped = draw(ShapeObject("circle", "red", "small", 0.75, 0.5), ShapeObject("square", "blue", "small", 0.25, 0.5))
    result = score(relation, detect_objects(swapped))
    assert result["objects"] and result["number"] and not result["relation"] and not result["correct"]

    result = score(
        parse_caption("a green circle"), detect_objects(draw(ShapeObject("triangle", "green", "large", 0.5, 0.5)))
    )
    assert not result["shape"] and result["colour"] and not result["correct"]

    small_right = draw(ShapeObject("circle", "red", "small", 0.75, 0.5))
    result = score(parse_caption("a large red circle on the left"), detect_objects(small_right))
    assert result["objects"] and not result["size"] and not result["position"]
    assert score(parse_caption("a small red circle on the right"), detect_objects(small_right))["correct"]

    pair = parse_caption("a red circle and a blue square")
    extra = draw(left, right, ShapeObject("triangle", "green", "small", 0.5, 0.2))
    result = score(pair, detect_objects(extra))
    assert result["number"] is False and not result["correct"]
    swapped_binding = draw(
        ShapeObject("square", "red", "small", 0.25, 0.5), ShapeObject("circle", "blue", "small", 0.75, 0.5)
    )
    result = score(pair, detect_objects(swapped_binding))
    assert result["colour"] and result["shape"] and not result["objects"] and not result["correct"]


def test_specks_are_ignored_and_inputs_may_be_arrays():
    image = np.array(draw(ShapeObject("square", "yellow", "small", 0.3, 0.7)))
    image[3:5, 26:28] = COLOURS["blue"]  # a 2x2 speck
    (det,) = detect_objects(image)
    assert (det.colour, det.shape, det.size, nearest_position(det)) == ("yellow", "square", "small", "left")
    assert abs(det.x - 0.3) < 0.02 and abs(det.y - 0.7) < 0.02 and det.mask.shape == (32, 32)
    assert [d.summary() for d in detect_objects(image.astype(np.float32) / 255)] == [det.summary()]
    assert detect_objects(np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)) == []


def test_build_suite_is_fixed_and_complete():
    suite = build_suite()
    assert suite == build_suite() and suite != build_suite(seed=1)
    counts = Counter(e.category for e in suite)
    assert tuple(counts) == CATEGORIES
    assert all(counts[c] == 20 for c in ("single", "position", "counting", "attribute_binding", "relative_position"))
    assert counts["held_out"] == 8
    for e in suite:
        assert parse_caption(e.text) == e.prompt
        assert ("purple triangle" in e.text) == (e.category == "held_out")
    assert all(e.prompt.position for e in suite if e.category == "position")
    assert any(e.prompt.size for e in suite if e.category == "single")


def ground_truth(prompts: list[str], seed_offset: int) -> list[Image.Image]:
    """A perfect model on a textured background (image ``seed_offset + i`` seeded by its number)."""
    return perfect_model(prompts, seed_offset, texture=6.0)


def test_evaluate_perfect_and_blank_models(tmp_path):
    suite = build_suite(per_kind=6)
    report = evaluate(ground_truth, suite, samples_per_prompt=2, batch_size=16, progress=False)
    print(report.table())
    assert set(report.accuracy) == set(CATEGORIES) and min(report.accuracy.values()) >= 0.95
    assert report.counts["counting"] == 12 and len(report.records) == 2 * len(suite)
    again = evaluate(ground_truth, suite, samples_per_prompt=2, batch_size=7, progress=False)
    assert again.records == report.records  # image i is seeded by its number, whatever the batch size

    def blank(prompts: list[str], seed_offset: int) -> list[Image.Image]:
        return [Image.new("RGB", (32, 32), BACKGROUND) for _ in prompts]

    report = evaluate(blank, suite, samples_per_prompt=1, progress=False)
    assert all(a == 0.0 for a in report.accuracy.values()) and report.overall == 0.0
    payload = json.loads(json.dumps(report.to_json()))
    assert set(payload["categories"]) == set(CATEGORIES) and len(payload["failures"]) == len(suite)
    assert all(f"| {c} |" in report.table() for c in CATEGORIES)
    png = report.save_failure_grid(tmp_path / "failures.png", max_images=10)
    listed = json.loads((tmp_path / "failures.json").read_text())
    assert len(listed) == 10 and all("text" in r and "criteria" in r for r in listed)
    with Image.open(png) as grid:
        assert grid.size == (4 * 66 + 2, 3 * 66 + 2)


def test_evaluate_pipeline_seeds_every_image():
    seen: list[int] = []

    class FakePipe:  # draws the ground truth from each image's generator seed
        def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
            assert output_type == "pil" and num_inference_steps == 3 and guidance_scale == 2.0
            assert isinstance(generator, list) and len(generator) == len(prompts)
            seeds = [g.initial_seed() for g in generator]
            seen.extend(seeds)
            images = [ground_truth([p], s)[0] for p, s in zip(prompts, seeds)]
            return type("Output", (), {"images": images})()

    suite = build_suite(per_kind=2)
    report = evaluate_pipeline(
        FakePipe(), suite, samples_per_prompt=1, num_inference_steps=3, guidance_scale=2.0, seed=100, progress=False
    )
    assert seen == list(range(100, 100 + len({e.text for e in suite})))
    assert report.overall >= 0.95
