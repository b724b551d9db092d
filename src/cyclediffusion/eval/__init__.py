"""Evaluation: ShapesEval, the offline text-alignment benchmark on the synthetic shapes world."""

from __future__ import annotations

from .shapes_eval import (
    CATEGORIES,
    Detection,
    EvalPrompt,
    EvalReport,
    build_suite,
    category_correct,
    detect_objects,
    evaluate,
    evaluate_pipeline,
    nearest_position,
    relation_holds,
    score,
)

__all__ = [
    "CATEGORIES",
    "Detection",
    "EvalPrompt",
    "EvalReport",
    "build_suite",
    "category_correct",
    "detect_objects",
    "evaluate",
    "evaluate_pipeline",
    "nearest_position",
    "relation_holds",
    "score",
]
