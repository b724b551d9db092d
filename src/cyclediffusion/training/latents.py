"""The cache of VAE latents: encode a dataset once (posterior mean and logvar), keep it beside the run, and reuse
it while the VAE, its weights, the data options and the captions are the same.

:func:`latent_dataset` is what a run calls; :class:`CachedLatents` serves the cached rows, whose latents are drawn
at train time (``DiagonalGaussian(batch["latent_params"])``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ..config import weights_digest
from ..models import AutoencoderKL
from ..options import to_plain
from ..progress import progress
from .data import LONG_JOB, CaptionedImages, collate
from .options import DataOptions

log = logging.getLogger("cyclediffusion")


def latent_dataset(
    images: CaptionedImages, vae: AutoencoderKL, data: DataOptions, out: Path, device: torch.device
) -> CachedLatents:
    """Encode the images once (posterior mean and logvar); reuse the run's cache when it matches.

    The cache is keyed by the VAE's config and weights, the data options and a hash of the captions.
    """
    path = out / "latents.safetensors"
    meta = {
        "vae": json.dumps(vae.config_dict(), sort_keys=True),
        "vae_weights": weights_digest(vae),
        "data": json.dumps(to_plain(data), sort_keys=True),
        "captions": hashlib.sha256("\n".join(images.captions).encode()).hexdigest(),
    }
    if path.is_file():
        params, captions, old = load_latent_cache(path)
        if old == meta:
            log.info("using the cached latents in %s", path)
            return CachedLatents(params, captions)
    t0 = time.perf_counter()
    params = encode_latent_parameters(images, vae, batch_size=128, device=device)
    log.info("cached %d latents in %.1fs", len(params), time.perf_counter() - t0)
    save_latent_cache(path, params, images.captions, meta)
    return CachedLatents(params, images.captions)


@torch.no_grad()
def encode_latent_parameters(
    dataset: CaptionedImages,
    vae: torch.nn.Module,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
) -> torch.Tensor:
    """VAE posterior parameters (N, 2C, h, w), float32 on the CPU: row i is ``vae.encode(dataset[i])``.

    Each row is mean and logvar concatenated (``posterior.parameters``). The VAE runs in eval mode on
    ``device`` in ``dtype``, and is put back where it was, in the mode it was in, afterwards.
    """
    first = next(vae.parameters())
    place, was_training = (first.device, first.dtype), vae.training
    vae.to(device, dtype).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    bar = progress(total=len(dataset), desc="encoding latents", unit="img", enabled=len(dataset) > LONG_JOB)
    out, start = None, 0
    try:
        for batch in loader:
            params = vae.encode(batch["pixels"].to(device, dtype)).parameters.float().cpu()
            if out is None:
                out = torch.empty(len(dataset), *params.shape[1:])
            out[start : start + len(params)] = params
            start += len(params)
            bar.update(len(params))
    finally:
        vae.to(*place).train(was_training)
        bar.close()
    return out


class CachedLatents(Dataset):
    """Cached VAE posterior parameters with captions: items ``{"latent_params": (2C, h, w), "caption": str}``.

    Draw latents at train time with ``DiagonalGaussian(batch["latent_params"]).sample()``.
    """

    def __init__(self, parameters: torch.Tensor, captions: Sequence[str]) -> None:
        if parameters.ndim != 4 or len(parameters) != len(captions):
            raise ValueError(f"need (N, 2C, h, w) parameters and N captions, got {tuple(parameters.shape)}")
        self.parameters, self.captions = parameters, list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latent_params": self.parameters[index], "caption": self.captions[index]}


def save_latent_cache(
    path: str | os.PathLike, parameters: torch.Tensor, captions: Sequence[str], meta: dict[str, Any]
) -> None:
    """Write ``parameters`` to ``path`` (safetensors) and captions + ``meta`` (JSON) beside it (``.json``)."""
    path = Path(path)
    if len(parameters) != len(captions):
        raise ValueError(f"{len(parameters)} latents but {len(captions)} captions")
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {"shape": list(parameters.shape), "captions": list(captions), "meta": meta}
    for target, write in (
        (path, lambda tmp: save_file({"parameters": parameters.detach().cpu().contiguous()}, str(tmp))),
        (path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(sidecar), encoding="utf-8")),
    ):
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        os.replace(tmp, target)


def load_latent_cache(path: str | os.PathLike) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """``(parameters, captions, meta)`` written by :func:`save_latent_cache`; compare ``meta`` to reuse it."""
    path = Path(path)
    parameters = load_file(str(path))["parameters"]
    sidecar = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    if sidecar["shape"] != list(parameters.shape) or len(sidecar["captions"]) != len(parameters):
        raise ValueError(f"latent cache {path} does not match its captions file; delete both to re-encode")
    return parameters, sidecar["captions"], sidecar["meta"]
