"""Every GPU check in one go, for the few minutes a GPU machine is lent: tests, training MFU, latency, edit speed.

    python benchmarks/gpu_suite.py                 # on a CUDA machine, about 6 minutes; writes runs/gpu_suite.json
    python benchmarks/gpu_suite.py --quick --device cpu   # seconds, for the test that keeps it working

In order, each part started only while the budget lasts (a part left out says so in the JSON):
the ``gpu`` test marker (``pytest -m gpu``), training throughput and MFU in bf16 and fp32 of the U-Net base and
DiT-B/2 at 32x32x4 latents (``train_throughput.py --sizes gpu``), batch-1 and batch-8 sampling latency of the demo
architecture with and without ``torch.compile`` (``sampling_latency.py``), and CycleDiffusion edit speed against
diffusers (``edit_speed.py``). The figures go to one JSON file as they come, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine_line, versions_line

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu_suite.json"), help="the JSON file of figures")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=7.5, help="budget of the whole suite")
    parser.add_argument("--quick", action="store_true", help="tiny versions of each part (CPU, for the tests)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    report: dict = {"machine": machine_line(args.device), "versions": versions_line(), "device": args.device}
    quick = ["--quick"] if args.quick else []
    parts = [
        ("gpu_tests", None, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]),
        ("train_throughput", "train_throughput", [*quick, "--sizes", "gpu", "--precision", "bf16,32"]),
        ("sampling_latency", "sampling_latency", [*quick, "--steps", "50", "--batch-sizes", "1,8", "--guidance", "4"]),
        ("sampling_latency_compiled", "sampling_latency", [*quick, "--steps", "50", "--batch-sizes", "1",
                                                            "--guidance", "4", "--compile"]),
        ("edit_speed", "edit_speed", [*quick, "--sizes", "64,256"]),
    ]  # fmt: skip
    if args.quick:
        parts = [p for p in parts if p[0] not in ("gpu_tests", "sampling_latency_compiled")]
    for name, module, extra in parts:
        left = deadline - time.monotonic()
        if left < 20:
            report[name] = {"skipped": f"the {args.minutes:g}-minute budget was spent"}
        else:
            t0 = time.perf_counter()
            try:
                if module is None:
                    proc = subprocess.run(extra, cwd=ROOT, capture_output=True, text=True, timeout=min(left, 150))
                    result = {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:]}
                else:
                    result = {"rows": importlib.import_module(module).main([*extra, "--device", args.device])}
            except Exception as error:  # one failing part must not lose the others' figures
                result = {"error": f"{type(error).__name__}: {error}"}
            result["seconds"] = time.perf_counter() - t0
            report[name] = result
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
