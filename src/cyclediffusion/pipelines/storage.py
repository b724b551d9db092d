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
from ..config import REGISTRY, WEIGHTS_NAME, Configurable, read_json, write_json

INDEX_NAME = "model_index.json"


class NotAPipelineError(ValueError):
    """The folder given as a model is not a saved cyclediffusion pipeline."""


def save_components(
    directory: str | Path, pipeline_class: str, components: dict[str, Any], settings: dict[str, Any] | None = None
) -> None:
    """Write every component into its own sub-folder and the index naming their classes (and ``settings``,
    ``_``-prefixed keys such as the default guidance)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline_class, "_cyclediffusion_version": __version__, **(settings or {})}
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
        components[name] = load_component(REGISTRY[class_name], directory / name, device)
    return str(index.get("_class_name", "")), components


def load_component(cls: type[Configurable], folder: Path, device: str | torch.device | None = None) -> Any:
    """``cls.from_pretrained(folder)`` with any fault of the folder (a malformed config, weights missing, in a
    pickle-based ``.bin`` or not matching the config) reported as one :class:`NotAPipelineError` naming it."""
    if not folder.is_dir():
        raise NotAPipelineError(f"{folder}: the component folder is missing")
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickled and not (folder / WEIGHTS_NAME).is_file() and issubclass(cls, torch.nn.Module):
        raise NotAPipelineError(
            f"{folder} holds {pickled[0]}, a pickle-based file, which is never loaded: save the weights as "
            f"{WEIGHTS_NAME} (safetensors)"
        )
    try:
        return cls.from_pretrained(folder, device=device)
    except NotAPipelineError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NotAPipelineError(f"{folder}: cannot load the {cls.__name__}: {reason}") from err


def resolve_model_dir(path: str | Path, marker: str = INDEX_NAME, component: str | None = None) -> Path:
    """A model folder: ``path`` or its ``model/`` (a run folder) holding ``marker``; with ``component``, that
    component's folder inside either is found too (``tokenizer/`` or ``vae/`` of a pipeline)."""
    path = Path(path)
    bases = [path, path / "model"]
    for candidate in bases + ([b / component for b in bases] if component else []):
        if (candidate / marker).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    inside = f"in it or in {path / 'model'}" + (f", nor in their {component}/" if component else "")
    raise FileNotFoundError(f"{path} holds no {component or 'model'} (no {marker} {inside})")


def find_pipeline(path: str | Path) -> Path:
    """The saved pipeline at ``path`` or in its ``model/``; a folder holding none is a :class:`NotAPipelineError`."""
    try:
        return resolve_model_dir(path)
    except FileNotFoundError as err:
        if not Path(path).exists():
            raise
        raise NotAPipelineError(f"{err}: not a saved pipeline") from None
