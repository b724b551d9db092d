"""Training with PyTorch Lightning: data, LightningModules, callbacks and the run functions the CLI calls.

Needs the ``train`` extra (lightning, datasets, tensorboard); inference does not import this package.
"""

from __future__ import annotations

from .modules import CycleConfig
from .train import (
    CaptionerOptions,
    DataOptions,
    ModelOptions,
    RunOptions,
    train_captioner,
    train_text2image,
    train_vae,
)

__all__ = [
    "CaptionerOptions",
    "CycleConfig",
    "DataOptions",
    "ModelOptions",
    "RunOptions",
    "train_captioner",
    "train_text2image",
    "train_vae",
]
