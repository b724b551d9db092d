"""Training with PyTorch Lightning: data, LightningModules, callbacks and the run functions the CLI calls.

Needs the ``train`` extra (lightning, datasets, tensorboard); inference does not import this package. The
options (:mod:`.options`) import no Lightning, so that the CLI can build its parser without it; the run
functions load Lightning on first use.
"""

from __future__ import annotations

from typing import Any

from .options import (
    CaptionerOptions,
    CycleConfig,
    DataOptions,
    DistillOptions,
    ModelOptions,
    RunOptions,
    VAEOptions,
)

_RUNS = ("distill_text2image", "train_captioner", "train_text2image", "train_vae")


def __getattr__(name: str) -> Any:
    if name in _RUNS:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CaptionerOptions",
    "CycleConfig",
    "DataOptions",
    "DistillOptions",
    "ModelOptions",
    "RunOptions",
    "VAEOptions",
    "distill_text2image",
    "train_captioner",
    "train_text2image",
    "train_vae",
]
