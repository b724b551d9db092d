"""Time to the first training step on big data: an imagefolder checked up front (the default), the same with
``--no-check-images``, and tar shards read as a stream.

    python benchmarks/first_step.py                       # 1,000,000 metadata rows; the checked run on 100,000
    python benchmarks/first_step.py --rows 20000 --checked-rows 20000 --quick

Writes a synthetic imagefolder whose ``metadata.jsonl`` has ``--rows`` lines over ``--files`` distinct 32 px PNGs
(rows reuse files, as a dataset of that many rows would read that many), then runs ``cyclediffusion train --steps
1`` on it in a fresh process (a tiny U-Net in pixel space) and reads from its log when the first step began: the
figure is the wall time from the command's start to the end of step 1, and the time spent before training (reading
the metadata, checking images, training the tokenizer). The checked run decodes every row before training, so it is
timed on ``--checked-rows`` rows and also given per million rows. The tar shards (``--shards`` of ``--files`` rows
each, one written and the rest hard links to it, WebDataset layout ``00001.png`` + ``00001.txt``) are streamed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import machine_line, versions_line

from cyclediffusion.data.shapes import ShapesConfig, caption_for, render, sample_scene, scene_rng

TINY = ["--model-size", "tiny", "--text-width", "32", "--text-layers", "1", "--vocab-size", "300", "--image-size",
        "16", "--batch-size", "8", "--ema-decay", "0", "--no-progress", "--accelerator", "cpu"]  # fmt: skip


def write_folder(root: Path, rows: int, files: int) -> Path:
    """``rows`` metadata lines over ``files`` rendered scenes (each line keeps its scene's caption)."""
    root.mkdir(parents=True, exist_ok=True)
    world = ShapesConfig(size=32, texture=0.0)
    captions = []
    for i in range(files):
        scene = sample_scene(scene_rng(0, i), world)
        render(scene, 32).save(root / f"{i:05d}.png")
        captions.append(caption_for(scene))
    with (root / "metadata.jsonl").open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"file_name": f"{i % files:05d}.png", "text": captions[i % files]}) + "\n")
    return root


def write_shards(root: Path, shards: int, files: int) -> Path:
    """``shards`` tar shards of ``files`` scenes each: one written, the others hard links to it."""
    root.mkdir(parents=True, exist_ok=True)
    world = ShapesConfig(size=32, texture=0.0)
    first = root / "000000.tar"
    with tarfile.open(first, "w") as archive:
        for i in range(files):
            scene = sample_scene(scene_rng(0, i), world)
            buffer = io.BytesIO()
            render(scene, 32).save(buffer, "PNG")
            for name, data in ((f"{i:05d}.png", buffer.getvalue()), (f"{i:05d}.txt", caption_for(scene).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    for s in range(1, shards):
        os.link(first, root / f"{s:06d}.tar")
    return root


def first_step(data: Path, out: Path, checked: bool) -> dict[str, float]:
    """Seconds from the command's start to the end of step 1, and of it the part before the first batch."""
    command = [sys.executable, "-m", "cyclediffusion", "train", "--data", str(data), "--out", str(out), "--steps", "1",
               "--log-every", "1", *TINY, *([] if checked else ["--no-check-images"])]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_time = float(rows[0]["time"]) if rows and "time" in rows[0] else float("nan")
    return {"seconds": total, "training_seconds": step_time}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="metadata rows of the unchecked run")
    parser.add_argument("--checked-rows", type=int, default=100_000, help="metadata rows of the checked run")
    parser.add_argument("--files", type=int, default=512, help="distinct image files the rows point at")
    parser.add_argument("--shards", type=int, default=1000, help="tar shards of --files rows each (streamed)")
    parser.add_argument("--out", default=None, help="folder for the data and runs (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.checked_rows, args.files, args.shards = 300, 100, 16, 20
    root = Path(args.out or tempfile.mkdtemp(prefix="first_step_"))
    print(machine_line("cpu"))
    print(versions_line())
    results = {}
    for label, rows, checked in (("unchecked", args.rows, False), ("checked", args.checked_rows, True)):
        t0 = time.perf_counter()
        data = write_folder(root / f"data_{rows}", rows, min(args.files, rows))
        written = time.perf_counter() - t0
        result = first_step(data, root / f"run_{label}", checked) | {"rows": rows, "write_seconds": written}
        result["per_million_rows"] = result["seconds"] * 1e6 / rows if checked else None  # it grows with the rows
        results[label] = result
    t0 = time.perf_counter()
    shards = write_shards(root / f"shards_{args.shards}", args.shards, args.files)
    written = time.perf_counter() - t0
    result = first_step(shards, root / "run_shards", checked=True)  # tar shards are always streamed
    results["tar shards"] = result | {
        "rows": args.shards * args.files,
        "write_seconds": written,
        "per_million_rows": None,
    }
    print(f"\nimagefolder over {args.files} distinct 32 px PNGs; `cyclediffusion train --steps 1`, tiny U-Net\n")
    print("| data | rows | seconds to the end of step 1 | per million rows (linear) |")
    print("| --- | ---: | ---: | ---: |")
    for label, r in results.items():
        how = {"unchecked": "--no-check-images", "checked": "checked up front (default)"}.get(label, "streamed")
        how = f"{how} ({'tar shards' if label == 'tar shards' else 'imagefolder'})"
        scaled = "-" if r["per_million_rows"] is None else f"{r['per_million_rows']:.1f}"
        print(f"| {how} | {r['rows']:,} | {r['seconds']:.1f} | {scaled} |")
    (root / "first_step.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {root / 'first_step.json'}")
    return results


if __name__ == "__main__":
    main()
