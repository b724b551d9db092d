"""A saved pipeline: ``model_index.json`` plus one folder per component (diffusers' layout).

::

    model/
      model_index.json          {"_class_name": "Text2ImagePipeline", "denoiser": "UNet", "vae": null, ...}
      tokenizer/                tokenizer.json, config.json
      text_encoder/             config.json, model.safetensors
      vae/                      config.json, model.safetensors
      denoiser/                 config.json, model.safetensors
      noise_process/            config.json

Component classes are resolved through the registry of :mod:`cyclediffusion.config`, never imported
by a name read from disk, and weights are read with safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import REGISTRY, Configurable, read_json, write_json

INDEX_NAME = "model_index.json"


class NotAPipelineError(ValueError):
    """The folder given as a model is not a saved cyclediffusion pipeline."""


def save_components(directory: str | Path, pipeline_class: str, components: dict[str, Any]) -> None:
    """Write every component into its own sub-folder and the index naming their classes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline_class, "_cyclediffusion_version": __version__}
    for name, component in components.items():
        if component is None:
            index[name] = None
            continue
        if not isinstance(component, Configurable):
            raise TypeError(f"component {name!r} ({type(component).__name__}) cannot be saved: not Configurable")
        component.save_pretrained(directory / name)
        index[name] = type(component).__name__
    write_json(directory / INDEX_NAME, index)


def load_components(directory: str | Path, device: str | torch.device | None = None) -> tuple[str, dict[str, Any]]:
    """Read a folder written by :func:`save_components`: (pipeline class name, components)."""
    directory = Path(directory)
    if not (directory / INDEX_NAME).is_file():
        raise NotAPipelineError(f"{directory} is not a saved pipeline (no {INDEX_NAME})")
    index = read_json(directory / INDEX_NAME)
    components: dict[str, Any] = {}
    for name, class_name in index.items():
        if name.startswith("_"):
            continue
        if class_name is None:
            components[name] = None
            continue
        if class_name not in REGISTRY:
            raise NotAPipelineError(f"{directory / INDEX_NAME}: unknown component class {class_name!r}")
        components[name] = REGISTRY[class_name].from_pretrained(directory / name, device=device)
    return str(index.get("_class_name", "")), components


def resolve_model_dir(path: str | Path, marker: str = INDEX_NAME) -> Path:
    """A model folder, or a run folder whose ``model/`` holds one (``marker`` names the file to look for)."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / marker).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(f"{path} holds no model (no {marker} in it or in {path / 'model'})")
