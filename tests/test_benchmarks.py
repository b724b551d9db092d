"""The benchmark scripts keep working (their --quick modes); timings are printed, never asserted."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
