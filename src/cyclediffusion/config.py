"""Configs and weight files: every component is a dataclass config plus safetensors weights.

A component class declares ``config_class`` (a dataclass) and takes an instance of it in
``__init__``. :class:`Configurable` then gives it ``from_config``, ``save_pretrained`` and
``from_pretrained``: a folder with ``config.json`` (the dataclass fields plus ``_class_name``)
and, for modules, ``model.safetensors``. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

T = TypeVar("T", bound="Configurable")

# Class name -> class, filled by ``Configurable.__init_subclass__``. Loading resolves
# ``_class_name`` only through this registry, never through an import by name.
REGISTRY: dict[str, type[Configurable]] = {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from_dict(config_class: type, data: dict[str, Any]) -> Any:
    """Build ``config_class`` from a dict, ignoring ``_``-prefixed keys; unknown keys are an error.

    Lists are turned back into tuples where the field's default is a tuple.
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(k for k in data if not k.startswith("_") and k not in fields)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        if name.startswith("_"):
            continue
        field = fields[name]
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if isinstance(value, list) and isinstance(default, tuple):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return config_class(**kwargs)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from ``path`` with a clear error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class Configurable:
    """Mixin for components described by a dataclass config (models, noise processes).

    Subclasses set ``config_class`` and store ``self.config`` in ``__init__``. Modules
    (``torch.nn.Module`` subclasses) also get their ``state_dict`` saved as safetensors.
    """

    config_class: ClassVar[type]
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.__name__] = cls

    @classmethod
    def from_config(cls: type[T], config: Any = None, **overrides: Any) -> T:
        """Build from a config instance, a dict, or keyword overrides of the defaults."""
        if config is None:
            config = cls.config_class()
        elif isinstance(config, dict):
            config = config_from_dict(cls.config_class, config)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        return cls(config)  # type: ignore[call-arg]

    def config_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict, with ``_class_name``."""
        return {"_class_name": type(self).__name__, **config_to_dict(self.config)}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (and ``model.safetensors`` for modules) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / CONFIG_NAME, self.config_dict())
        if isinstance(self, torch.nn.Module):
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(_untie(state), str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls: type[T], directory: str | Path, device: str | torch.device | None = None) -> T:
        """Load a component written by :meth:`save_pretrained` (weights via safetensors only).

        Called on :class:`Configurable` itself, the class is taken from ``_class_name``.
        """
        directory = Path(directory)
        data = read_json(directory / CONFIG_NAME)
        target: type[Configurable] = cls
        name = data.get("_class_name")
        if name is not None and name != cls.__name__:
            if name not in REGISTRY or not issubclass(REGISTRY[name], cls):
                raise ValueError(f"{directory} holds a {name}, not a {cls.__name__}")
            target = REGISTRY[name]
        if target is not cls:  # the subclass may store more than config + weights (tokenizer.json)
            return target.from_pretrained(directory, device=device)  # type: ignore[return-value]
        obj = target.from_config(data)
        if isinstance(obj, torch.nn.Module):
            weights = directory / WEIGHTS_NAME
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found")
            obj.load_state_dict(load_file(str(weights)), strict=True)
            obj.eval()
            if device is not None:
                obj.to(device)
        return obj  # type: ignore[return-value]


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: clone the later ones."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        if ptr in seen and ptr != -1:
            value = value.clone()
        seen.add(ptr)
        out[key] = value
    return out


def weights_digest(module: torch.nn.Module) -> str:
    """A SHA-256 of a module's config and weights (names and float32 values): equal digests, equal networks."""
    digest = hashlib.sha256(repr(getattr(module, "config", None)).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
