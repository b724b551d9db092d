"""Evaluation: ShapesEval, the offline text-alignment benchmark on the synthetic shapes world, and VAE
reconstruction metrics (PSNR, SSIM, latent statistics), captioner accuracy."""

from __future__ import annotations

from .caption_eval import CaptionScores, evaluate_captioner
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
    ground_truth,
    nearest_position,
    relation_holds,
    score,
    training_holdout,
)
from .vae_eval import (
    VAEReport,
    evaluate_vae,
    evaluate_vae_folder,
    find_vae_dir,
    holdout_subset,
    load_vae,
    psnr,
    shapes_ceiling,
    ssim,
)

__all__ = [
    "CATEGORIES",
    "CaptionScores",
    "Detection",
    "EvalPrompt",
    "EvalReport",
    "VAEReport",
    "build_suite",
    "category_correct",
    "detect_objects",
    "evaluate",
    "evaluate_captioner",
    "evaluate_pipeline",
    "evaluate_vae",
    "evaluate_vae_folder",
    "ground_truth",
    "shapes_ceiling",
    "find_vae_dir",
    "holdout_subset",
    "load_vae",
    "nearest_position",
    "psnr",
    "relation_holds",
    "score",
    "ssim",
    "training_holdout",
]
