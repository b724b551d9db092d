"""How well a trained VAE reconstructs images, and whether its latent scaling suits them.

:func:`evaluate_vae` encodes images (latent means), decodes them and reports PSNR and SSIM on [0, 1] pixels,
the per-channel statistics of the scaled diffusion latents ``vae.encode_latents(x, sample=False)`` and the
scaling factor measured on these images (as :func:`~cyclediffusion.models.vae.measure_latent_scaling` does at
export: 1 / std of posterior samples) next to the one stored in the VAE's config.

:func:`ssim` is Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5) over each channel, ``K1 = 0.01``,
``K2 = 0.03``, valid positions only (no padding), averaged over positions and channels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ..images import images_to_tensor, numpy_to_pil
from ..models.vae import AutoencoderKL
from ..pipelines.base import pick_device
from ..pipelines.storage import resolve_model_dir
from ..progress import progress as progress_bar
from .shapes_eval import EvalPrompt, EvalReport, build_suite, evaluate, ground_truth

PSNR_CAP = 100.0  # dB: PSNR of identical images (an MSE floor of 1e-10 on [0, 1] pixels)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(range^2 / MSE)`` in dB, of (B, C, H, W) batches.

    Identical images give :data:`PSNR_CAP` (not infinity, so that means and JSON stay finite).
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    floor = data_range**2 * 10 ** (-PSNR_CAP / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``size`` taps (float64); SSIM's 2-D window is its outer product."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: bool = False,
) -> torch.Tensor:
    """The local structural similarity of (B, C, H, W) batches in [0, ``data_range``] (float64, per channel).

    Local means, variances and covariance are Gaussian-weighted over each channel separately, at every position
    where the window fits (images smaller than the window use a window of their size); ``padding`` reflects the
    borders so that the map has the images' size (for averaging over a region)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    size = min(window_size, x.shape[-2], x.shape[-1])
    g = gaussian_window(size, sigma).to(x.device)
    channels = x.shape[1]
    rows, cols = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
    x, y = x.double(), y.double()
    if padding:
        low, high = (size - 1) // 2, size // 2
        x, y = (F.pad(t, (low, high, low, high), mode="reflect") for t in (x, y))

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, **window: Any) -> torch.Tensor:
    """Structural similarity per image of (B, C, H, W) batches in [0, ``data_range``] (float64 result): the
    :func:`ssim_map` averaged over positions and channels."""
    return ssim_map(x, y, data_range, **window).flatten(1).mean(1)


@dataclass
class VAEReport:
    """Reconstruction quality and latent statistics of a VAE on a set of images.

    ``psnr`` (dB) and ``ssim`` are means over images of per-image values on [0, 1] pixels, ``mse`` the mean
    squared error there. ``latent_mean`` / ``latent_std`` are per channel over the scaled latents (posterior
    means through ``(z - shift_factor) * scaling_factor``), ``latent_overall_*`` over all their elements:
    about 0 and 1 when the stored factors suit these images. ``measured_scaling_factor`` /
    ``measured_shift_factor`` are ``1 / std`` and mean of unscaled posterior samples, as measured at export.
    """

    num_images: int
    image_size: tuple[int, int]
    latent_shape: tuple[int, int, int]
    psnr: float
    psnr_min: float
    ssim: float
    mse: float
    latent_mean: list[float]
    latent_std: list[float]
    latent_overall_mean: float
    latent_overall_std: float
    scaling_factor: float
    shift_factor: float
    measured_scaling_factor: float
    measured_shift_factor: float

    def table(self) -> str:
        """A Markdown table of the metrics."""
        h, w = self.image_size
        c, lh, lw = self.latent_shape
        lines = ["| metric | value |", "| --- | ---: |"]
        rows = [
            ("images", f"{self.num_images} at {h}x{w}, latents {lh}x{lw}x{c}"),
            ("PSNR (dB, mean / worst image)", f"{self.psnr:.2f} / {self.psnr_min:.2f}"),
            ("SSIM", f"{self.ssim:.4f}"),
            ("MSE ([0, 1] pixels)", f"{self.mse:.3g}"),
            ("scaled latents: mean / std", f"{self.latent_overall_mean:.3f} / {self.latent_overall_std:.3f}"),
            ("per-channel mean", ", ".join(f"{v:.3f}" for v in self.latent_mean)),
            ("per-channel std", ", ".join(f"{v:.3f}" for v in self.latent_std)),
            ("scaling factor: stored / here", f"{self.scaling_factor:.4f} / {self.measured_scaling_factor:.4f}"),
            ("shift factor: stored / here", f"{self.shift_factor:.4f} / {self.measured_shift_factor:.4f}"),
        ]
        return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: every field (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _batches(images: torch.Tensor | Dataset | Iterable[Any], batch_size: int) -> Iterator[torch.Tensor]:
    """(B, C, H, W) batches in [-1, 1] from a tensor, a dataset of tensors or ``{"pixels": ...}`` items, or an
    iterable of batches (tensors or dicts with ``pixels``)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    if isinstance(images, Dataset) and hasattr(images, "__len__"):
        n = len(images)  # type: ignore[arg-type]
        for start in range(0, n, batch_size):
            items = [images[i] for i in range(start, min(start + batch_size, n))]
            yield torch.stack([item["pixels"] if isinstance(item, dict) else item for item in items])
        return
    for batch in images:
        yield batch["pixels"] if isinstance(batch, dict) else batch


@torch.no_grad()
def evaluate_vae(
    vae: AutoencoderKL,
    images: torch.Tensor | Dataset | Iterable[Any],
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> VAEReport:
    """Reconstruct ``images`` (in [-1, 1]) through ``vae`` and measure PSNR, SSIM and latent statistics.

    ``images`` is an (N, C, H, W) tensor, a dataset whose items are tensors or ``{"pixels": tensor}``
    (a :class:`~cyclediffusion.training.data.CaptionedImages`), or an iterable of such batches. Images are
    encoded to their posterior means and decoded; reconstructions are clamped to [-1, 1] and both sides
    mapped to [0, 1]. The VAE runs where its parameters are, in eval mode, and is put back in its mode after.
    The posterior samples behind ``measured_scaling_factor`` are drawn with a generator seeded ``seed``.
    """
    param = next(vae.parameters())
    device, dtype = param.device, param.dtype
    was_training = vae.training
    vae.eval()
    generator = torch.Generator(device).manual_seed(seed)
    psnrs, ssims, mses = [], [], []
    lat_sum = lat_sq = None
    lat_count, z_sum, z_sq, z_count = 0, 0.0, 0.0, 0
    shapes: tuple[tuple[int, int], tuple[int, int, int]] | None = None
    bar = progress_bar(desc="vae eval", unit="img", enabled=progress)
    try:
        for batch in _batches(images, batch_size):
            x = batch.to(device, dtype)
            posterior = vae.encode(x)
            recon = vae.decode(posterior.mode())
            latents = vae.scale_latents(posterior.mode()).double()
            z = posterior.sample(generator).double()  # as measure_latent_scaling draws them
            if shapes is None:
                shapes = (tuple(x.shape[-2:]), tuple(latents.shape[1:]))  # type: ignore[assignment]
            real = (x.double().clamp(-1, 1) + 1) / 2
            fake = (recon.double().clamp(-1, 1) + 1) / 2
            psnrs.append(psnr(fake, real).cpu())
            ssims.append(ssim(fake, real).cpu())
            mses.append((fake - real).pow(2).flatten(1).mean(1).cpu())
            per_channel = latents.transpose(0, 1).flatten(1)
            lat_sum = per_channel.sum(1) if lat_sum is None else lat_sum + per_channel.sum(1)
            lat_sq = per_channel.pow(2).sum(1) if lat_sq is None else lat_sq + per_channel.pow(2).sum(1)
            lat_count += per_channel.shape[1]
            z_sum += z.sum().item()
            z_sq += z.pow(2).sum().item()
            z_count += z.numel()
            bar.update(len(x))
    finally:
        vae.train(was_training)
        bar.close()
    if shapes is None or lat_sum is None or lat_sq is None:
        raise ValueError("evaluate_vae got no images")
    mean_c = (lat_sum / lat_count).cpu()
    var_c = (lat_sq / lat_count).cpu() - mean_c**2
    overall_mean = float(mean_c.mean())
    overall_var = float((lat_sq.sum() / (lat_count * len(lat_sq))).cpu()) - overall_mean**2
    z_mean = z_sum / z_count
    z_var = max(z_sq / z_count - z_mean**2, 0.0)
    psnr_all = torch.cat(psnrs)
    return VAEReport(
        num_images=len(psnr_all),
        image_size=shapes[0],
        latent_shape=shapes[1],
        psnr=float(psnr_all.mean()),
        psnr_min=float(psnr_all.min()),
        ssim=float(torch.cat(ssims).mean()),
        mse=float(torch.cat(mses).mean()),
        latent_mean=[float(v) for v in mean_c],
        latent_std=[math.sqrt(max(float(v), 0.0)) for v in var_c],
        latent_overall_mean=overall_mean,
        latent_overall_std=math.sqrt(max(overall_var, 0.0)),
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(vae.config.shift_factor),
        measured_scaling_factor=1.0 / math.sqrt(z_var) if z_var > 0 else math.inf,
        measured_shift_factor=z_mean,
    )


@torch.no_grad()
def shapes_ceiling(
    vae: AutoencoderKL,
    samples_per_prompt: int = 2,
    image_size: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    suite: Sequence[EvalPrompt] | None = None,
) -> EvalReport:
    """ShapesEval of the ground-truth renders of ``suite`` (default :func:`~.shapes_eval.build_suite`) after ``vae``
    encodes them (posterior means) and decodes them.

    This is what a perfect denoiser on this VAE would score: a category far below 1 (say attribute binding 0.1)
    means the VAE, not the text-to-image model, caps it, and the VAE needs more training. Renders are
    ``image_size`` pixels on the plain background (the shapes world of :func:`~.shapes_eval.build_suite`).
    """
    parameter = next(vae.parameters())

    def generate_fn(prompts: list[str], seed_offset: int) -> list[Any]:
        images = ground_truth(prompts, seed + seed_offset, image_size)
        pixels = images_to_tensor(images, vae.downsample_factor).to(parameter)
        recon = vae.decode(vae.encode(pixels).mean).float()
        return numpy_to_pil((recon / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())

    return evaluate(generate_fn, build_suite() if suite is None else suite, samples_per_prompt, batch_size, progress)


def holdout_subset(dataset: Dataset, fraction: float) -> Dataset:
    """The last ``fraction`` of ``dataset`` (at least one item); ``fraction`` 1 keeps all of it.

    A VAE trained on the first part of a dataset is fairly judged on the rest; when the images given are
    already held out (a separate folder), keep them all.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the held-out fraction must be in (0, 1], got {fraction}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("no images to hold out")
    if fraction == 1:
        return dataset
    keep = max(1, round(n * fraction))
    return Subset(dataset, range(n - keep, n))


def find_vae_dir(path: str | Path) -> Path:
    """The folder of a saved VAE: ``path`` itself or its ``model/`` (a ``train-vae`` run), or the ``vae/`` of
    a saved pipeline at ``path`` or ``path/model`` (a ``train`` run or an exported pipeline)."""
    try:
        return resolve_model_dir(path, "config.json", component="vae")
    except FileNotFoundError:
        if not Path(path).exists():
            raise
    try:
        pipeline = resolve_model_dir(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds no VAE (no config.json in it, in its model/ or vae/)") from None
    raise ValueError(f"the pipeline in {pipeline} has no VAE (its model works on pixels)")


def load_vae(path: str | Path, device: str | torch.device | None = None) -> AutoencoderKL:
    """:class:`AutoencoderKL` from a VAE folder, a run folder or a pipeline folder (see :func:`find_vae_dir`)."""
    return AutoencoderKL.from_pretrained(find_vae_dir(path), device=device)


def evaluate_vae_folder(
    model: str | Path,
    data: Any,
    holdout: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
    shapes_eval: int = 0,
) -> tuple[VAEReport, EvalReport | None, Path]:
    """``eval-vae``: evaluate the VAE found at ``model`` (see :func:`find_vae_dir`) on the last ``holdout`` share
    of ``data`` (:class:`~cyclediffusion.training.options.DataOptions`), and with ``shapes_eval`` samples per prompt
    its :func:`shapes_ceiling` too; write the reports as JSON to ``out`` (a file or folder; default
    ``RUN/eval/vae_eval.json``) and return them with the path written."""
    import json

    from ..training.data import load_images

    if not 0 < holdout <= 1:
        raise ValueError(f"--holdout must be in (0, 1], got {holdout}")
    if shapes_eval < 0:
        raise ValueError(f"--shapes-eval must be 0 (off) or a number of samples per prompt, got {shapes_eval}")
    vae_dir = find_vae_dir(model)
    vae = load_vae(vae_dir, device=pick_device(device))
    if data.image_size % vae.downsample_factor:
        raise ValueError(f"--image-size {data.image_size} is not a multiple of the VAE's {vae.downsample_factor}")
    from ..training.streaming import CaptionedStream

    images = load_images(data)
    if isinstance(images, CaptionedStream):
        raise ValueError("eval-vae holds out a share of a dataset it can index; give it no stream")
    report = evaluate_vae(vae, holdout_subset(images, holdout), batch_size=batch_size, seed=seed)
    ceiling = shapes_ceiling(vae, shapes_eval, data.image_size, seed=seed, progress=True) if shapes_eval else None
    extra = {} if ceiling is None else {"shapes_ceiling": {"overall": ceiling.overall, "accuracy": ceiling.accuracy}}
    in_pipeline = vae_dir.name == "vae" and (vae_dir.parent / "model_index.json").is_file()
    path = Path(out) if out else (vae_dir.parent.parent if in_pipeline else vae_dir.parent) / "eval"
    path = path if path.suffix == ".json" else path / "vae_eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": str(vae_dir), "data": data.data, **report.to_json(), **extra}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return report, ceiling, path
