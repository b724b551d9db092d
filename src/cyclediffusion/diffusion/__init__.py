"""Noise processes: each owns its schedule, training target, loss and samplers; models never know which."""

from __future__ import annotations

from typing import Any

from .base import ModelFn, TrainingLoss, immiscible, randn
from .flow import FlowConfig, FlowMatching
from .gaussian import GaussianConfig, GaussianDiffusion, canonical_prediction_type

NoiseProcess = GaussianDiffusion | FlowMatching


def create_noise_process(kind: str = "ddpm", **options: Any) -> NoiseProcess:
    """``ddpm``: Gaussian diffusion (options of :class:`GaussianConfig`); ``flow``: of :class:`FlowConfig`."""
    if kind in ("ddpm", "gaussian", "ddim"):
        return GaussianDiffusion(GaussianConfig(**options))
    if kind in ("flow", "flow_matching"):
        return FlowMatching(FlowConfig(**options))
    raise ValueError(f"unknown noise process {kind!r}; choose 'ddpm' or 'flow'")


__all__ = [
    "FlowConfig",
    "FlowMatching",
    "GaussianConfig",
    "GaussianDiffusion",
    "ModelFn",
    "NoiseProcess",
    "TrainingLoss",
    "canonical_prediction_type",
    "create_noise_process",
    "immiscible",
    "randn",
]
