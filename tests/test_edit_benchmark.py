"""The edit and translation benchmarks: their metrics on ground truth, and their --quick modes end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cyclediffusion.data.shapes import render
from cyclediffusion.pipelines.edit import GENERAL_METHODS

from helpers import load


def in_unit(value) -> bool:
    return value is not None and 0.0 <= value <= 1.0


def test_edit_metrics_on_ground_truth():
    """A perfect edit (the target scene rendered) succeeds, keeps the other attribute, the object's place and the
    background; the unedited source fails."""
    bench = load("edit_benchmark")
    for case in bench.make_cases(4, 32, seed=3):
        scene, target, edited = case["scene"], case["target"], case["ideal"]
        obj = replace(scene.objects[0], colour=target.colours[0], shape=target.shapes[0])
        assert np.array_equal(edited, np.asarray(render(replace(scene, objects=(obj,)), 32)))
        assert target.size == scene.prompt.size and target.position == scene.prompt.position
        assert (target.colours != scene.prompt.colours) == (case["kind"] != "shape")
        assert (target.shapes != scene.prompt.shapes) == (case["kind"] != "colour")
        done = bench.measure(case, edited, target)
        assert done["success"] and done["kept"] in (True, None) and done["iou"] == 1.0
        assert done["psnr_out"] == bench.PSNR_CAP and (done["iou_source"] == 1.0) == (case["kind"] == "colour")
        untouched = bench.measure(case, case["image"], target)
        assert not untouched["success"] and untouched["iou_source"] == 1.0 and untouched["psnr_out"] == bench.PSNR_CAP
        assert (untouched["iou"] < 0.9) == (case["kind"] != "colour")


@pytest.mark.usefixtures("one_thread")
def test_edit_benchmark_quick(tmp_path, capsys):
    result = load("edit_benchmark").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| kind | method | strength | success | kept | IoU | PSNR-out (dB) |" in out and "matched success" in out
    saved = json.loads((tmp_path / "edit_benchmark.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {(r["kind"], r["method"], r["strength"]): r for r in saved["rows"]}
    for kind in ("colour", "shape", "both"):
        assert in_unit(rows[kind, "reconstruction", 0.0]["iou"])
        for method in GENERAL_METHODS:
            for strength in (0.5, 0.8):
                row = rows[kind, method, strength]
                assert row["n"] == 2 and in_unit(row["success"]) and in_unit(row["iou"])
                assert in_unit(row["kept"]) if kind != "both" else row["kept"] is None
                assert row["psnr_out"] is None or row["psnr_out"] > 0
    n = len(GENERAL_METHODS)
    assert len(saved["rows"]) == 3 * (1 + n * 2) and len(saved["records"]) == 6 * (1 + n * 2)
    assert set(saved["matched_success"]) == set(GENERAL_METHODS)
    assert saved["examples"]["columns"] == ["source", *(f"{m} @ 0.8" for m in GENERAL_METHODS)]
    with Image.open(tmp_path / "edit_examples.png") as grid:  # 6 rows (2 per kind) x (1 + n) columns of 32 px, 4x
        assert grid.size == (4 * ((1 + n) * 34 + 2), 4 * (6 * 34 + 2))


def test_translate_metrics_on_ground_truth():
    bench = load("translate_shapes")
    assert bench.box_iou((0, 0, 1, 1), (0.5, 0, 1.5, 1)) == pytest.approx(1 / 3)
    scene = bench.sample_scene(bench.scene_rng(0, 0), bench.world(("circle",), bench.EVAL_COLOURS))
    as_square = replace(scene, objects=(replace(scene.objects[0], shape="square"),))
    source = bench.measure(scene, np.asarray(render(scene, 32)))
    assert not source["square"] and source["colour"] and source["box_iou"] > 0.8
    ideal = bench.measure(scene, np.asarray(render(as_square, 32)))
    assert ideal["both"] and ideal["size"] and ideal["box_iou"] > 0.8 and ideal["centre_px"] < 1.0


@pytest.mark.usefixtures("one_thread")
def test_translate_shapes_quick(tmp_path, capsys):
    load("translate_shapes").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| prompts | method | strength | square | colour | square & colour | box IoU |" in out
    saved = json.loads((tmp_path / "translate_shapes.json").read_text())
    rows = {(r["mode"], r["method"], r["strength"]): r for r in saved["rows"]}
    assert rows["-", "source", 0.0]["square"] == 0.0 and rows["-", "source", 0.0]["colour"] == 1.0
    for mode in ("empty", "caption"):
        for method in GENERAL_METHODS:
            for strength in (0.5, 0.8):
                row = rows[mode, method, strength]
                assert row["n"] == 3 and all(in_unit(row[k]) for k in ("square", "colour", "both", "box_iou", "size"))
                assert row["centre_px"] is None or row["centre_px"] >= 0
    assert len(rows) == 1 + 2 * len(GENERAL_METHODS) * 2 and set(saved["best"]) == {
        f"{m}/{k}" for m in ("empty", "caption") for k in GENERAL_METHODS
    }
    for name in ("translate_grid", "translate_methods"):
        assert (tmp_path / f"{name}.png").is_file()
    for domain in ("circles", "squares"):
        assert (tmp_path / domain / "model" / "model_index.json").is_file()
