"""Shapes-PIE: its triplets and metrics on ground truth, and its --quick mode end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cyclediffusion.data.shapes import parse_caption

from helpers import load


def test_triplets_cover_every_edit_type_with_exact_masks():
    bench = load("shapes_pie")
    cases = bench.make_triplets(6, 32)
    assert [c["kind"] for c in cases] == [k for k in bench.EDIT_TYPES for _ in range(6)]
    for case in cases:
        assert parse_caption(case["target"]) == case["prompt"] and parse_caption(case["source"]).kind
        assert case["source"] != case["target"]
        outside = ~case["mask"]
        assert 0 < case["mask"].mean() < 0.6
        assert np.array_equal(case["image"][outside], case["ideal"][outside])  # the mask holds the whole edit
        perfect = bench.measure(case, case["ideal"])  # the ideal edit succeeds and keeps everything outside
        assert perfect["success"], (case["kind"], case["target"])
        assert perfect["psnr_out"] == 100.0 and perfect["ssim_out"] > 0.99 and perfect["mse_out"] == 0
        assert perfect["iou"] == 1.0
        unchanged = bench.measure(case, case["image"])  # doing nothing fails
        assert not unchanged["success"], (case["kind"], case["source"], case["target"])


def test_preservation_metrics_see_damage_outside_only():
    bench = load("shapes_pie")
    case = bench.make_triplets(1, 32)[0]
    damaged = case["ideal"].copy()
    damaged[~case["mask"]] = 255 - damaged[~case["mask"]]
    inside = case["ideal"].copy()
    inside[case["mask"]] = 0
    assert bench.preservation(case["image"], damaged, case["mask"])["psnr_out"] < 10
    kept = bench.preservation(case["image"], inside, case["mask"])
    assert kept["psnr_out"] == 100.0 and kept["pie_psnr"] == 100.0  # only the mask's pixels changed


def test_variant_names_carry_the_coupling_shares():
    bench = load("shapes_pie")
    default = bench.parse_variant("cycle+p2p", 50)["coupling"]
    assert (default.cross_steps, default.self_steps) == (0.8, 0.0)
    spec = bench.parse_variant("ddim_inversion+p2p0.3s0.2@20", 50)
    assert spec["method"] == "ddim_inversion" and spec["steps"] == 20 and spec["mask"] is None
    assert (spec["coupling"].cross_steps, spec["coupling"].self_steps) == (0.3, 0.2)
    assert bench.parse_variant("cycle+mask", 50)["coupling"] is None
    assert bench.parse_variant("ef_ddpm+mask+rs2", 50)["resample"] == 2
    assert bench.parse_variant("ef_ddpm+mask", 50)["resample"] == 0
    for bad in ("cycle+p2px", "cycle+p2p1.5", "cycle+blend", "dpm", "cycle+mask+rs"):
        with pytest.raises(ValueError):
            bench.parse_variant(bad, 50)


def test_shapes_pie_quick(tmp_path, capsys, monkeypatch):
    bench = load("shapes_pie")
    args = ["--quick", "--out", str(tmp_path), "--batch-size", "7"]
    result = bench.main(args)
    saved = json.loads((tmp_path / "shapes_pie.json").read_text())
    assert saved["settings"]["n"] == 2 and (tmp_path / "shapes_pie_examples.png").is_file()
    overall = {r["variant"]: r for r in result["rows"] if r["kind"] == "all"}
    assert set(overall) == set(bench.DEFAULT_VARIANTS) - {"flowedit"}  # the quick pipeline is a DDPM model
    masked = [r for r in result["records"] if "+mask" in r["variant"]]
    assert len(masked) == 2 * 14 * 3 and all(r["psnr_out"] == 100.0 for r in masked)  # exact outside the mask
    assert overall["ef_ddpm+mask+rs2"]["nfe"] > overall["ef_ddpm+mask"]["nfe"]  # resampled: more passes
    assert overall["cycle@20"]["nfe"] > overall["cycle"]["nfe"] > 0
    assert overall["cycle+auto"]["nfe"] > overall["cycle"]["nfe"]  # the mask reading is counted
    assert 0 <= overall["cycle"]["gated_ssim_out"] <= overall["cycle"]["ssim_out"]
    assert result["sanity_gate"]["checked"]
    assert "sanity gate" in capsys.readouterr().out

    # A run stopped after one and a half cells goes on where it stopped and ends with the same records.
    partial = tmp_path / "records.jsonl"
    partial.write_text("\n".join(partial.read_text().splitlines()[: 1 + 14 + 7]) + "\n")
    edited = []
    run_variant = bench.run_variant
    monkeypatch.setattr(bench, "run_variant", lambda *a: edited.append(a[2]) or run_variant(*a))
    resumed = bench.main(args)
    assert len(edited) == 2 * len(overall) - 1  # every cell but the finished first one

    def measured(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert measured(resumed["records"]) == measured(result["records"])
    assert len(partial.read_text().splitlines()) == 1 + len(result["records"])  # the cut-off half cell is gone
