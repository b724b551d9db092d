"""The benchmark scripts keep working (their --quick modes); timings are printed, never asserted."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from cyclediffusion import Text2ImagePipeline

from helpers import load


def test_train_throughput_quick(capsys):
    load("train_throughput").main(["--quick", "--precision", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "matmul peak: 32" in out
    rows = [line for line in out.splitlines() if line.startswith("| ours") or line.startswith("| diffusers")]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        images_per_s, gflop_per_image, mfu = float(cells[4]), float(cells[5]), cells[7]
        assert images_per_s > 0 and gflop_per_image > 0 and re.fullmatch(r"\d+\.\d%", mfu)
    assert re.search(r"U-Net speed ratio ours / diffusers \(demo\), 32: \d+\.\d\dx", out)


def test_attention_flops_formula():
    bench = load("train_throughput")
    assert bench.attention_flops((2, 4, 16, 8), (2, 4, 10, 8), (2, 4, 10, 8)) == 2 * 2 * 4 * 16 * 10 * 16


def table_rows(out: str) -> list[list[str]]:
    """The cells of the printed Markdown table's data rows (those starting with a number)."""
    rows = [line for line in out.splitlines() if re.match(r"\| [\d.]+ \|", line)]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


@pytest.mark.usefixtures("one_thread")
def test_sampling_latency_quick(capsys):
    load("sampling_latency").main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "\nversions: python " in out and "torch " in out
    assert "process peak RSS" in out and "U-Net 'tiny'" in out
    rows = table_rows(out)
    assert [(int(r[0]), int(r[1]), float(r[2])) for r in rows] == [(1, 2, 1.0), (1, 2, 2.0)]
    for row in rows:
        seconds, ms_per_image, per_second = float(row[3]), float(row[4]), float(row[5])
        assert all(math.isfinite(v) and v > 0 for v in (seconds, ms_per_image, per_second))
        peak, raised = re.fullmatch(r"(\d+) \(\+(\d+)\)", row[6]).groups()
        assert int(peak) > 0 and int(raised) >= 0


@pytest.mark.usefixtures("one_thread")
def test_quality_per_compute_quick(capsys, tmp_path):
    load("quality_per_compute").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "ShapesEval: " in out
    header = next(line for line in out.splitlines() if line.startswith("| minutes"))
    assert [c.strip() for c in header.strip("|").split("|")][:4] == ["minutes", "steps", "overall", "colour"]
    rows = table_rows(out)
    assert [float(r[0]) for r in rows] == [0.03, 0.06]
    for row in rows:
        assert int(row[1]) >= 1
        assert all(math.isfinite(float(v)) and 0 <= float(v) <= 1 for v in row[2:])
    saved = json.loads((tmp_path / "quality_per_compute.json").read_text())
    assert [r["steps"] for r in saved] == [int(r[1]) for r in rows] and saved[0]["train_seconds"] > 0


@pytest.mark.usefixtures("one_thread")
def test_cycle_ablation_quick(capsys, tmp_path):
    load("cycle_ablation").main(["--quick", "--out", str(tmp_path), "--optimizer", "muon"])
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "\nversions: python " in out and "ShapesEval: " in out
    printed = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert printed[0] == "config" and printed[2:] == ["start", "w0", "x0_ce_w0.5"]
    from cyclediffusion.eval import CATEGORIES

    saved = json.loads((tmp_path / "cycle_ablation.json").read_text())
    categories = set(saved["start"]["accuracy"])
    assert categories == set(CATEGORIES) and 0 <= saved["start"]["overall"] <= 1
    assert [c["name"] for c in saved["configs"]] == ["w0", "x0_ce_w0.5"]
    plain, cycle = saved["configs"]
    assert plain["cycle"] is None and cycle["cycle"]["weight"] == 0.5
    for config in saved["configs"]:
        (run,) = config["runs"]
        assert run["seed"] == 0 and run["steps"] == 3 and math.isfinite(run["denoise_loss"])
        assert (tmp_path / f"{config['name']}_s0" / "shapes_eval.json").is_file()
        summary = config["summary"]
        assert set(summary["accuracy"]) == categories
        for stats in [summary["overall"], *summary["accuracy"].values()]:
            assert stats["n"] == 1 and 0 <= stats["min"] <= stats["mean"] <= stats["max"] <= 1
    assert plain["runs"][0]["cycle_loss"] is None and cycle["runs"][0]["cycle_loss"] > 0
    assert cycle["summary"]["step_cost_vs_w0"]["mean"] > 0 and "binding_minus_w0" in cycle["summary"]
    recorded = json.loads((tmp_path / "x0_ce_w0.5_s0" / "result.json").read_text())
    assert recorded["key"]["cycle"]["weight"] == 0.5 and recorded["run"]["steps"] == 3  # what a rerun reuses
    assert recorded["key"]["optimizer"] == "muon"
    assert yaml.safe_load((tmp_path / "w0_s0" / "options.yaml").read_text())["run"]["optimizer"] == "muon"
    assert "overall_minus_w0" in cycle["summary"] and "overall_minus_w0" not in plain["summary"]


def test_edit_speed_quick(capsys, one_thread):
    pytest.importorskip("diffusers")
    rows = load("edit_speed").main(["--quick", "--device", "cpu"])
    assert len(rows) == 1 and rows[0]["ours_s"] > 0 and rows[0]["diffusers_s"] > 0
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.slow
def test_edit_speed_compiled_column(capsys, one_thread):
    """``--compile`` times a second, compiled pipeline beside the eager one (tens of seconds of compiling)."""
    pytest.importorskip("diffusers")
    rows = load("edit_speed").main(["--quick", "--device", "cpu", "--compile"])
    assert rows[0]["ours_compiled_s"] > 0 and rows[0]["compile_s"] > 0
    assert rows[0]["compiled_max_diff"] < 1e-4  # the compiled pipeline edits as the eager one does
    assert "compiled (first call" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_composition_ablation_quick(capsys, tmp_path):
    results = load("composition_ablation").main(
        ["--quick", "--out", str(tmp_path), "--variants", "base,all", "--seeds", "0,1"]
    )
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "| variant | steps | overall | colour |" in out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ba")]
    rows += [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| all")]
    assert [r[0] for r in rows] == ["base", "all"] and all(r[1] == "2" for r in rows)
    assert re.fullmatch(r"\d\.\d{3} ± \d\.\d{3} \([+-]\d\.\d{3}\)", rows[1][2])  # mean ± std (paired difference)
    for runs in results.values():
        assert [r["seed"] for r in runs] == [0, 1] and all(0 <= r["overall"] <= 1 for r in runs)
    assert (tmp_path / "data_all" / "metadata.jsonl").is_file()  # the caption variant wrote its own world
    mixed = Text2ImagePipeline.from_pretrained(tmp_path / "all_s0")
    assert mixed.text_encoder.config.refiner_layers == 1 and mixed.denoiser.config.coord_channels
    # --merge adds a variant to the saved table; run options reach the run; --snapshots evaluates the model a run
    # had after those minutes (0: after its first step) as a row of its own
    merged = load("composition_ablation").main(
        ["--quick", "--out", str(tmp_path), "--variants", "fast", "--seeds", "0", "--merge", "--snapshots", "0"]
    )
    assert list(merged) == ["base", "all", "fast", "fast@0min"] and merged["base"] == results["base"]
    assert merged["fast"][0]["steps"] == 2 and merged["fast@0min"][0]["steps"] == 1
    first, last = (Text2ImagePipeline.from_pretrained(tmp_path / "fast_s0" / f) for f in ("model_at_0min", "model"))
    after = last.denoiser.state_dict()
    assert any(not torch.equal(w, after[k]) for k, w in first.denoiser.state_dict().items())  # EMA moved on
    assert yaml.safe_load((tmp_path / "fast_s0" / "options.yaml").read_text())["run"]["lr_schedule"] == "cosine"
    for bad in ("ten", "10,-5"):  # a one-line usage error, exit 2
        with pytest.raises(SystemExit) as exit_info:
            load("composition_ablation").main(["--quick", "--out", str(tmp_path), "--snapshots", bad])
        assert exit_info.value.code == 2


def test_first_step_quick(capsys, tmp_path):
    results = load("first_step").main(["--quick", "--out", str(tmp_path)])
    assert results["unchecked"]["rows"] == 300 and results["checked"]["rows"] == 100
    assert all(r["seconds"] > 0 for r in results.values())
    assert (tmp_path / "run_unchecked" / "model" / "model_index.json").is_file()
    assert (
        results["tar shards"]["rows"] == 20 * 16 and (tmp_path / "run_shards" / "model" / "model_index.json").is_file()
    )
    assert "--no-check-images" in capsys.readouterr().out


def test_gpu_suite_quick_writes_every_part_it_ran(tmp_path):
    """The GPU suite's parts run (tiny, on the CPU) and their figures land in one JSON file."""
    report = load("gpu_suite").main(["--quick", "--device", "cpu", "--out", str(tmp_path / "suite.json")])
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for part in ("train_throughput", "sampling_latency", "edit_speed"):
        assert "error" not in saved[part], saved[part]
        assert saved[part]["rows"] and saved[part]["seconds"] > 0
    assert all(row["images_per_s"] > 0 and row["mfu"] > 0 for row in saved["train_throughput"]["rows"])


def test_attention_bf16_quick(capsys):
    load("attention_bf16").main(["--quick"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| demo DiT cross-attention")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert all(float(c) > 0 for c in cells[1:5])


def test_step_overhead_quick(capsys):
    figures = load("step_overhead").main(["--quick", "--batch", "4"])
    assert set(figures) == {
        "adamw_loop_ms", "adamw_fused_ms", "muon_torch_ms", "muon_batched_ms", "ema_per_tensor_ms", "ema_foreach_ms",
        "dit_step_tanh_gelu_ms", "dit_step_exact_gelu_ms",
    }  # fmt: skip
    assert all(v > 0 for v in figures.values())


@pytest.mark.usefixtures("one_thread")
def test_position_words_reads_a_saved_model(capsys, tmp_path):
    from helpers import randomise_zeros, tiny_pipeline

    pipe = tiny_pipeline("dit", "flow", size=32)
    randomise_zeros(pipe.denoiser)
    pipe.save_pretrained(tmp_path / "model")
    gaps = load("position_words").main(["--model", str(tmp_path / "model")])
    assert set(gaps) == {"0.7", "0.9", "0.99"}
    for row in gaps.values():
        assert set(row) == {"loss", "mirror", "axis", "word", "preposition"}
        assert row["loss"] > 0 and all(math.isfinite(v) for v in row.values())
        assert any(row[k] != 0 for k in ("mirror", "axis"))  # the caption reaches the loss


def test_count_layout_reads_data_and_samples(capsys, tmp_path):
    from cyclediffusion.data.shapes import ShapesConfig, write_imagefolder

    world = ShapesConfig(kinds={"count": 1.0}, texture=0.0)
    write_imagefolder(tmp_path / "data", 90, world, seed=0)

    def det(x: float, y: float) -> dict:
        return {"colour": "red", "shape": "circle", "x": x, "y": y}

    corners = [det(0.2, 0.2), det(0.8, 0.2), det(0.2, 0.8), det(0.8, 0.8)]
    records = [
        {"text": "three red circles", "category": "counting", "correct": False, "detections": corners},
        {
            "text": "three red circles",
            "category": "counting",
            "correct": False,
            "detections": corners[:3] + [det(0.3, 0.3)],
        },
        {"text": "three red circles", "category": "counting", "correct": True, "detections": corners[:3]},
        {"text": "a red circle", "category": "single", "correct": True, "detections": corners[:1]},
    ]
    (tmp_path / "eval.json").write_text(json.dumps({"overall": 0.5, "records": records}))
    result = load("count_layout").main(["--data", str(tmp_path / "data"), "--eval", str(tmp_path / "eval.json")])
    # small objects GAP apart cannot share a quadrant: two and three always stand one per quadrant
    assert set(result["data"]) == {1, 2, 3} and sum(r["scenes"] for r in result["data"].values()) == 90
    assert result["data"][2]["own_quadrant"] == result["data"][3]["own_quadrant"] == 1.0
    three = result["samples"][3]
    assert (three["samples"], three["correct"], three["one_more"], three["spread"]) == (3, 1, 2, 1)
    assert three["detected"] == {3: 1, 4: 2} and set(result["samples"]) == {3}
    with pytest.raises(SystemExit):
        load("count_layout").main([])


def test_ema_tracks_quick(capsys, tmp_path):
    from safetensors.torch import load_file

    results = load("ema_tracks").main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--decays", "0.15,0.9999"])
    row = results["0"]
    assert row["steps"] == 3 and set(row) == {"steps", "ema 0.999", "raw", "0.15", "0.9999"}
    raw, fast, slow = (load_file(str(tmp_path / "s0" / f"track_{n}.safetensors")) for n in ("raw", "0.15", "0.9999"))
    model = load_file(str(next((tmp_path / "s0" / "model").rglob("denoiser/*.safetensors"))))
    key = next(k for k in raw if k.startswith("denoiser.") and k.split(".", 1)[1] in model)
    # three steps: the warm-up sets any decay above 0.25 to 0.1, 0.18, 0.25, so the 0.9999 track is the run's own
    # (exported) EMA; 0.15 caps the second and third updates and differs, and so do the raw weights
    torch.testing.assert_close(slow[key], model[key.split(".", 1)[1]])
    assert not torch.equal(fast[key], slow[key]) and not torch.equal(raw[key], slow[key])
    assert 0 <= row["raw"]["overall"] <= 1


@pytest.mark.usefixtures("one_thread")
def test_guidance_screen_quick(capsys, tmp_path):
    bench = load("guidance_screen")
    u, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    # CFG-Zero*'s scale is the least-squares fit of cond by uncond: a multiple of uncond is kept whole, and a cond
    # orthogonal to uncond is guided from zero
    torch.testing.assert_close(bench.optimised_scale_guidance(u, 3 * u, 4.0), 3 * u)
    ortho = v - (v * u).sum((1, 2, 3), keepdim=True) / (u * u).sum((1, 2, 3), keepdim=True) * u
    torch.testing.assert_close(bench.optimised_scale_guidance(u, ortho, 4.0), 4 * ortho, atol=1e-5, rtol=1e-5)
    rows = bench.main(
        ["--quick", "--out", str(tmp_path), "--sampling-seeds", "0", "--variants", "shift1,shift3,cfgstar,cfgstar2"]
    )
    assert [r["variant"] for r in rows] == ["plain", "shift1", "shift3", "cfgstar", "cfgstar2"]
    categories = [k for k in rows[0] if k not in ("model", "seed", "variant")]
    assert all(rows[1][c] == rows[0][c] for c in categories)  # shift 1 is the plain sampler, same seeds
    assert "| cfgstar2 | 1 |" in capsys.readouterr().out
    pipe = Text2ImagePipeline.from_pretrained(rows[0]["model"])
    noise = torch.randn(1, *pipe.latent_shape(1, None, None)[1:], generator=torch.Generator().manual_seed(0))

    def sample(variant):
        bench.apply_variant(pipe, variant, 1.0)
        return pipe("a red circle", num_inference_steps=2, guidance_scale=4.0, latents=noise, output_type="latent")

    plain = sample("plain").images
    assert not torch.allclose(sample("cfgstar").images, plain)
    assert not torch.allclose(sample("shift3").images, plain)
    torch.testing.assert_close(sample("cfgstar2").images, noise)  # both steps zeroed: the start is returned
    # the two steps start at flow times 1 and 0.5: an interval holding both is plain guidance, one holding neither
    # is the conditional prediction alone, and one holding only the second differs from both
    torch.testing.assert_close(sample("interval0-1").images, plain)
    unguided = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, latents=noise, output_type="latent")
    torch.testing.assert_close(sample("interval0-0.4").images, unguided.images)
    half = sample("interval0-0.6").images
    assert not torch.allclose(half, plain) and not torch.allclose(half, unguided.images)
    # projected guidance: a difference along the clean estimate keeps only its parallel weight, the rest whole;
    # weight 1 is plain guidance, weight 0 differs
    along = bench.projected_difference(u, 2 * u + ortho, 0.25)
    torch.testing.assert_close(along, 0.5 * u + ortho, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample("apg1").images, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sample("apg0").images, plain)
    guide = Text2ImagePipeline.from_pretrained(rows[0]["model"])
    guide.denoiser.final_layer.linear.bias.data.add_(0.1)  # a guide that differs from the model
    pipe.guide = pipe.check_guide(guide)
    auto = sample("plain").images
    assert not torch.allclose(auto, plain)
    torch.testing.assert_close(sample("apg1").images, auto, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sample("apg0").images, auto)
    pipe.guide = None
    torch.testing.assert_close(sample("plain").images, plain)  # and each variant is undone by the next
