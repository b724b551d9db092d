"""Where counted objects stand: in a shapes data folder, and in a model's ShapesEval counting samples.

For each number word it prints, over the data's count captions, the share of scenes whose objects stand in as many
different quadrants of the image as there are objects; and, over the counting samples of a saved ShapesEval report
(``cyclediffusion eval`` writes ``shapes_eval.json``), how many objects were detected, and how many of the samples
that drew one object too many put each object in a quadrant of its own. A model that has learnt the quadrants of
its data but not which of them to leave empty draws "three" as four objects, one per quadrant.

    python benchmarks/count_layout.py --data runs/demo/data --eval runs/demo/t2i/eval/shapes_eval.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from cyclediffusion.data.shapes import NUMBERS


def quadrants(objects: Iterable[dict]) -> int:
    """How many of the image's four quadrants hold an object centre (``x``, ``y`` in [0, 1])."""
    return len({(o["x"] > 0.5, o["y"] > 0.5) for o in objects})


def number_of(text: str) -> int | None:
    """The count a counting caption names ("three red circles" -> 3), else None."""
    word = text.split(" ", 1)[0]
    return NUMBERS.index(word) + 1 if word in NUMBERS else None


def data_layout(folder: Path) -> dict[int, dict[str, float]]:
    """Per count, the scenes of the data folder and the share whose objects fill that many quadrants."""
    scenes: dict[int, list[int]] = {}
    with (folder / "metadata.jsonl").open() as rows:
        for line in rows:
            row = json.loads(line)
            if row.get("kind") == "count" and (n := number_of(row["text"])):
                scenes.setdefault(n, []).append(quadrants(row["objects"]) == n)
    return {n: {"scenes": len(v), "own_quadrant": sum(v) / len(v)} for n, v in sorted(scenes.items())}


def sample_layout(report: Path) -> dict[int, dict]:
    """Per count, the samples of the report's counting category: how many were right, the detected numbers, and
    how many of those with one object too many put every object in its own quadrant."""
    out: dict[int, dict] = {}
    for record in json.loads(report.read_text())["records"]:
        if record.get("category") != "counting" or not (n := number_of(record["text"])):
            continue
        row = out.setdefault(n, {"samples": 0, "correct": 0, "detected": Counter(), "one_more": 0, "spread": 0})
        found = record["detections"]
        row["samples"] += 1
        row["correct"] += bool(record["correct"])
        row["detected"][len(found)] += 1
        if len(found) == n + 1:
            row["one_more"] += 1
            row["spread"] += quadrants(found) == n + 1
    return {n: {**row, "detected": dict(sorted(row["detected"].items()))} for n, row in sorted(out.items())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a shapes imagefolder (metadata.jsonl with objects)")
    parser.add_argument("--eval", help="a shapes_eval.json written by `cyclediffusion eval`")
    args = parser.parse_args(argv)
    if not args.data and not args.eval:
        parser.error("give --data, --eval or both")
    result: dict = {}
    if args.data:
        result["data"] = data_layout(Path(args.data))
        print("| count | scenes | objects each in a quadrant of its own |\n| --- | ---: | ---: |")
        for n, row in result["data"].items():
            print(f"| {NUMBERS[n - 1]} | {row['scenes']} | {row['own_quadrant']:.3f} |")
    if args.eval:
        result["samples"] = sample_layout(Path(args.eval))
        print("\n| count | samples | right | objects detected: samples | one too many | of those, one per quadrant |")
        print("| --- | ---: | ---: | --- | ---: | ---: |")
        for n, row in result["samples"].items():
            found = ", ".join(f"{k}: {v}" for k, v in row["detected"].items())
            print(f"| {NUMBERS[n - 1]} | {row['samples']} | {row['correct']} | {found} | {row['one_more']} | "
                  f"{row['spread']} |")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
