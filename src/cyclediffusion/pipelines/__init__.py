"""Inference pipelines (no training code, no Lightning): text-to-image, CycleDiffusion editing and translation."""

from __future__ import annotations

from .base import DiffusionPipeline, Guidance, ImagePipelineOutput, PromptEmbeds
from .caption import CaptionPipeline
from .cycle import CycleDiffusionPipeline, translate
from .edit import METHODS, edit
from .storage import NotAPipelineError
from .text2image import Text2ImagePipeline

__all__ = [
    "METHODS",
    "CaptionPipeline",
    "CycleDiffusionPipeline",
    "Guidance",
    "edit",
    "translate",
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "NotAPipelineError",
    "PromptEmbeds",
    "Text2ImagePipeline",
]
