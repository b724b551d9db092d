"""Inference pipelines (no training code, no Lightning): text-to-image, and the storage they share."""

from __future__ import annotations

from .base import DiffusionPipeline, ImagePipelineOutput, PromptEmbeds
from .storage import NotAPipelineError
from .text2image import Text2ImagePipeline

__all__ = [
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "NotAPipelineError",
    "PromptEmbeds",
    "Text2ImagePipeline",
]
