"""Training runs: build the data, the models and Lightning's Trainer from options, then fit and export.

A run folder holds everything::

    OUT/model/          the exported inference model (safetensors + JSON), EMA weights
    OUT/checkpoints/    last.ckpt: Lightning's resume state (never handed to users as a model)
    OUT/logs/           TensorBoard events and metrics.jsonl
    OUT/samples/        sample grids of the fixed prompts
    OUT/options.json    the options of the run

A captioner run (:func:`train_captioner`) exports a caption pipeline to ``OUT/model`` and, with a
held-out share of the images, writes its scores to ``OUT/eval.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import write_json
from ..diffusion import FlowConfig, FlowMatching, GaussianConfig, GaussianDiffusion, NoiseProcess
from ..eval.caption_eval import evaluate_captioner
from ..models import (
    DIT_SIZES,
    AutoencoderKL,
    Captioner,
    CaptionerConfig,
    DiT,
    DiTConfig,
    TextEncoder,
    TextEncoderConfig,
    UNet,
    UNetConfig,
)
from ..models.vae import VAEConfig, measure_latent_scaling
from ..pipelines import Text2ImagePipeline
from ..pipelines.caption import CaptionPipeline
from ..pipelines.storage import resolve_model_dir
from ..text import TOKENIZER_NAME, Tokenizer
from .callbacks import EMA, Export, MetricsFile, ResumeCheckpoint, SampleGrid, Throughput, export_atomically
from .data import (
    CachedLatents,
    collate,
    encode_latent_parameters,
    load_captioned_images,
    load_latent_cache,
    save_latent_cache,
)
from .modules import CaptionerModule, CycleConfig, DiffusionModule, OptimConfig, VAEModule
from .sampler import StepBatchSampler, StepIndexed

log = logging.getLogger("cyclediffusion")

DEFAULT_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a small purple square on the left",
    "a large orange triangle at the top",
    "two cyan circles",
    "a red square and a blue circle",
]

UNET_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"block_channels": (32, 64), "layers_per_block": 1, "attention_levels": (False, True)},
    "small": {"block_channels": (64, 128), "layers_per_block": 1, "attention_levels": (False, True)},
    "medium": {"block_channels": (64, 128), "layers_per_block": 2, "attention_levels": (True, True)},
    "base": {"block_channels": (128, 256, 256), "layers_per_block": 2, "attention_levels": (False, True, True)},
}
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "depth": 4, "num_heads": 4, "patch_size": 1},
    "small": {"hidden_size": 256, "depth": 8, "num_heads": 4, "patch_size": 1},
    **DIT_SIZES,
}
VAE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"block_channels": (16, 32, 64, 64), "layers_per_block": 1},
    "small": {"block_channels": (32, 64, 128, 128), "layers_per_block": 1},
    "base": {"block_channels": (64, 128, 256, 256), "layers_per_block": 2},
}
CAPTIONER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "encoder_layers": 1, "decoder_layers": 2, "heads": 4, "stem_channels": 16},
    "small": {"width": 128, "encoder_layers": 2, "decoder_layers": 2, "heads": 4, "stem_channels": 32},
    "base": {"width": 256, "encoder_layers": 4, "decoder_layers": 4, "heads": 8, "stem_channels": 64},
}


@dataclass
class DataOptions:
    """Where the captioned images come from and how they are prepared."""

    data: str
    image_size: int = 32
    split: str = "train"
    cache_dir: str | None = None
    subset_size: int | None = None
    caption_column: str = "text"
    image_column: str = "image"
    num_workers: int = 0
    cache_latents: bool = False


@dataclass
class RunOptions:
    """Length, optimisation, precision, devices and bookkeeping of a training run."""

    out: str
    steps: int | None = None
    epochs: float | None = None
    minutes: float | None = None
    batch_size: int = 64
    lr: float = 1e-3
    wd: float = 0.0
    warmup: int = 100
    lr_schedule: str = "constant"
    precision: str = "32"
    accumulate: int = 1
    grad_clip: float | None = 1.0
    devices: int | str = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    seed: int = 0
    ema_decay: float | None = 0.999
    log_every: int = 25
    checkpoint_every: int = 500
    export_every: int = 0
    sample_every: int = 0
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not (self.steps or self.epochs or self.minutes):
            raise ValueError("give the length of the run: --steps, --epochs or --minutes")


@dataclass
class ModelOptions:
    """The text-to-image model: backbone, noise process and text encoder, or a pipeline to start from.

    ``init_from`` (an exported pipeline, or a run folder) supplies tokenizer, text encoder, denoiser,
    noise process and VAE, and the options that would build them are ignored. ``captioner`` (an
    exported caption pipeline) adds the cycle-consistency term described by ``cycle``.
    """

    backbone: str = "unet"
    model_size: str = "small"
    scheduler: str = "ddpm"
    prediction_type: str = "v_prediction"
    beta_schedule: str = "cosine"
    snr_gamma: float | None = 5.0  # min-SNR-5 (ddpm): ShapesEval shape 0.89 against 0.55 unweighted after 5 CPU min
    time_sampling: str = "logit_normal"
    vae: str | None = None
    caption_dropout: float = 0.1
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 1024
    max_length: int | None = None
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    init_from: str | None = None
    captioner: str | None = None
    cycle: CycleConfig = field(default_factory=CycleConfig)


@dataclass
class CaptionerOptions:
    """The captioner: a named size, its patch size, and its tokenizer (trained here, or ``tokenizer``'s).

    ``tokenizer`` is a tokenizer folder, or a model or run folder holding one (a text-to-image run's,
    so that both models share it). ``holdout`` keeps the last N images out of training to score the
    captioner on at the end (generated with ``num_beams``).
    """

    size: str = "small"
    patch_size: int | None = None
    tokenizer: str | None = None
    vocab_size: int = 1024
    max_length: int | None = None
    holdout: int = 0
    num_beams: int = 1


# --------------------------------------------------------------------------- shared plumbing
def total_steps(run: RunOptions, dataset_size: int, world: int) -> int | None:
    """Optimiser steps from ``--steps`` or ``--epochs`` (None: only a time budget)."""
    if run.steps:
        return run.steps
    if run.epochs:
        per_epoch = dataset_size // (run.batch_size * world * run.accumulate)
        return max(1, math.ceil(run.epochs * per_epoch))
    return None


def world_size(run: RunOptions) -> int:
    """Processes the run will use (for global batch sizes before the Trainer exists)."""
    if isinstance(run.devices, int) and run.devices > 0:
        return run.devices
    if run.accelerator == "cpu" or not torch.cuda.is_available():
        return 1
    return torch.cuda.device_count() if str(run.devices) in ("auto", "-1") else len(str(run.devices).split(","))


def make_loader(dataset: Dataset, run: RunOptions, trainer: L.Trainer, num_workers: int) -> DataLoader:
    """The step-keyed loader; it starts where the (possibly resumed) trainer stands."""
    sampler = StepBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        run.batch_size,
        trainer.world_size,
        trainer.global_rank,
        run.seed,
        start_step=trainer.global_step * run.accumulate,
    )
    return DataLoader(
        StepIndexed(dataset),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def fit(
    module: L.LightningModule,
    dataset: Dataset,
    run: RunOptions,
    steps: int | None,
    num_workers: int,
    callbacks: list[L.Callback],
) -> L.Trainer:
    """Fit ``module`` on ``dataset`` with the run's options; resumes from ``OUT/checkpoints/last.ckpt``."""
    out = Path(run.out)
    ckpt = out / "checkpoints" / "last.ckpt"
    resume_from = str(ckpt) if run.resume and ckpt.is_file() else None
    if resume_from:
        log.info("resuming from %s", resume_from)

    ema = [EMA(run.ema_decay)] if run.ema_decay else []
    # ResumeCheckpoint must come before EMA: on train end it saves before EMA swaps its weights in.
    all_callbacks = [ResumeCheckpoint(out / "checkpoints", run.checkpoint_every), *ema, *callbacks]
    all_callbacks.append(Throughput(run.batch_size * world_size(run)))  # images per micro-batch
    all_callbacks.append(MetricsFile(out / "logs" / "metrics.jsonl", run.log_every))
    trainer = L.Trainer(
        max_steps=steps if steps is not None else -1,
        max_time={"minutes": run.minutes} if run.minutes else None,
        max_epochs=-1,
        accelerator=run.accelerator,
        devices=run.devices,
        strategy=run.strategy,
        precision=run.precision,
        accumulate_grad_batches=run.accumulate,
        gradient_clip_val=run.grad_clip or None,
        callbacks=all_callbacks,
        logger=TensorBoardLogger(out, name="logs", version=""),
        log_every_n_steps=run.log_every,
        enable_checkpointing=False,
        enable_progress_bar=run.progress,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )

    module.train_dataloader = lambda: make_loader(dataset, run, trainer, num_workers)  # type: ignore[method-assign]
    trainer.fit(module, ckpt_path=resume_from, weights_only=True)
    return trainer


def write_options(out: Path, **groups: Any) -> None:
    as_dict = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in groups.items()}
    write_json(out / "options.json", as_dict)


# --------------------------------------------------------------------------- VAE
def build_vae(size: str, downsample: int) -> AutoencoderKL:
    """A VAE of a named size with ``downsample`` = 2, 4 or 8 (levels = log2(downsample) + 1)."""
    if size not in VAE_SIZES:
        raise ValueError(f"unknown VAE size {size!r}; choose from {', '.join(VAE_SIZES)}")
    levels = int(math.log2(downsample)) + 1
    if 2 ** (levels - 1) != downsample or levels < 2:
        raise ValueError(f"VAE downsampling must be 2, 4 or 8, got {downsample}")
    spec = dict(VAE_SIZES[size])
    chans = spec.pop("block_channels")[:levels]
    return AutoencoderKL(VAEConfig(block_channels=chans, norm_groups=math.gcd(32, chans[0]), **spec))


def train_vae(
    data: DataOptions, run: RunOptions, size: str = "tiny", downsample: int = 4, kl_weight: float = 1e-4
) -> Path:
    """Train a KL VAE, measure its latent scaling on the data, and export it to ``OUT/model``."""
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    write_options(out, data=data, run=run, vae={"size": size, "downsample": downsample, "kl_weight": kl_weight})
    L.seed_everything(run.seed, verbose=False)
    dataset = load_images(data)
    vae = build_vae(size, downsample)
    steps = total_steps(run, len(dataset), world_size(run))
    module = VAEModule(vae, optim_config(run, steps), kl_weight=kl_weight, seed=run.seed)
    trainer = fit(module, dataset, run, steps, data.num_workers, [])
    if trainer.is_global_zero:
        export_atomically(lambda m, p: export_vae(m.vae, dataset, p), module, out / "model")
    return out / "model"


def export_vae(vae: AutoencoderKL, dataset: Dataset, path: Path, batches: int = 16) -> None:
    """Measure ``scaling_factor`` / ``shift_factor`` on (part of) the data, then save the VAE."""
    vae.eval()
    device = next(vae.parameters()).device
    loader = DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=collate)
    images = (batch["pixels"].to(device) for _, batch in zip(range(batches), loader))
    scale, shift = measure_latent_scaling(vae, images)
    vae.config.scaling_factor, vae.config.shift_factor = scale, shift
    log.info("VAE latent scaling factor %.4f, shift %.4f", scale, shift)
    vae.save_pretrained(path)


def load_images(data: DataOptions):
    return load_captioned_images(
        data.data,
        data.image_size,
        split=data.split,
        cache_dir=data.cache_dir,
        subset_size=data.subset_size,
        caption_column=data.caption_column,
        image_column=data.image_column,
    )


def optim_config(run: RunOptions, steps: int | None) -> OptimConfig:
    return OptimConfig(
        lr=run.lr, weight_decay=run.wd, warmup_steps=run.warmup, schedule=run.lr_schedule, total_steps=steps
    )


# --------------------------------------------------------------------------- text-to-image
def build_noise_process(model: ModelOptions) -> NoiseProcess:
    if model.scheduler == "flow":
        return FlowMatching(FlowConfig(time_sampling=model.time_sampling))
    if model.scheduler == "ddpm":
        return GaussianDiffusion(
            GaussianConfig(
                beta_schedule=model.beta_schedule,
                prediction_type=model.prediction_type,
                snr_gamma=model.snr_gamma or None,
                timestep_spacing="trailing",
            )
        )
    raise ValueError(f"unknown scheduler {model.scheduler!r}; choose 'ddpm' or 'flow'")


def build_denoiser(model: ModelOptions, channels: int, sample_size: int, context_dim: int) -> torch.nn.Module:
    common = {"in_channels": channels, "out_channels": channels, "sample_size": sample_size}
    if model.backbone == "unet":
        if model.model_size not in UNET_SIZES:
            raise ValueError(f"unknown U-Net size {model.model_size!r}; choose from {', '.join(UNET_SIZES)}")
        spec = UNET_SIZES[model.model_size]
        groups = math.gcd(32, spec["block_channels"][0])
        return UNet(UNetConfig(**common, **spec, context_dim=context_dim, pooled_dim=context_dim, norm_groups=groups))
    if model.backbone == "dit":
        if model.model_size not in DIT_PRESETS:
            raise ValueError(f"unknown DiT size {model.model_size!r}; choose from {', '.join(DIT_PRESETS)}")
        return DiT(
            DiTConfig(**common, **DIT_PRESETS[model.model_size], context_dim=context_dim, pooled_dim=context_dim)
        )
    raise ValueError(f"unknown backbone {model.backbone!r}; choose 'unet' or 'dit'")


def prepare_tokenizer(out: Path, captions: list[str], vocab_size: int, max_length: int | None) -> Tokenizer:
    """Train the BPE tokenizer on the captions (or reload the run's own, when resuming).

    Without ``max_length`` the token length fits the longest caption (a multiple of 8, at most 77).
    """
    path = out / "tokenizer"
    if (path / TOKENIZER_NAME).is_file():
        return Tokenizer.from_pretrained(path)
    if max_length is None:
        probe = Tokenizer.train(captions, vocab_size=vocab_size, max_length=77)
        longest = int(probe(captions).attention_mask.sum(1).max())
        max_length = min(77, 8 * math.ceil(longest / 8))
    tokenizer = Tokenizer.train(captions, vocab_size=vocab_size, max_length=max_length)
    tokenizer.save_pretrained(path)
    return tokenizer


def latent_dataset(images, vae: AutoencoderKL, data: DataOptions, out: Path, device: torch.device) -> CachedLatents:
    """Encode the images once (posterior mean and logvar); reuse the run's cache when it matches.

    The cache is keyed by the VAE's config and weights, the data options and a hash of the captions.
    """
    path = out / "latents.safetensors"
    weights = hashlib.sha256()
    for tensor in vae.state_dict().values():
        weights.update(tensor.detach().cpu().numpy().tobytes())
    meta = {
        "vae": json.dumps(vae.config_dict(), sort_keys=True),
        "vae_weights": weights.hexdigest(),
        "data": json.dumps(dataclasses.asdict(data), sort_keys=True),
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


def train_text2image(data: DataOptions, run: RunOptions, model: ModelOptions) -> Path:
    """Train a text encoder and denoiser jointly (latent space with ``model.vae``, else pixels); export to OUT/model.

    With ``model.init_from`` training starts from an exported pipeline; with ``model.captioner`` the
    step adds the cycle-consistency loss (see :class:`~cyclediffusion.training.modules.CycleConfig`).
    """
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    write_options(out, data=data, run=run, model=model)
    L.seed_everything(run.seed, verbose=False)
    captioner = load_captioner(model.captioner, data.image_size) if model.captioner else None
    images = load_images(data)
    if model.init_from:
        pipe = load_initial_pipeline(model, data.image_size)
        tokenizer, text_encoder, denoiser, vae = pipe.tokenizer, pipe.text_encoder, pipe.denoiser, pipe.vae
        noise_process = pipe.noise_process
    else:
        vae = AutoencoderKL.from_pretrained(resolve_model_dir(model.vae, "config.json")) if model.vae else None
        tokenizer = prepare_tokenizer(out, images.captions, model.vocab_size, model.max_length)
        text_encoder = build_text_encoder(model, tokenizer)
        if vae is None:
            channels, sample_size = 3, data.image_size
        else:
            if data.image_size % vae.downsample_factor:
                raise ValueError(
                    f"--image-size {data.image_size} is not a multiple of the VAE's {vae.downsample_factor}"
                )
            channels, sample_size = vae.config.latent_channels, data.image_size // vae.downsample_factor
        denoiser = build_denoiser(model, channels, sample_size, model.text_width)
        noise_process = build_noise_process(model)
    dataset: Dataset = images
    if data.cache_latents and vae is not None:
        device = torch.device("cuda" if torch.cuda.is_available() and run.accelerator != "cpu" else "cpu")
        dataset = latent_dataset(images, vae, data, out, device)
    steps = total_steps(run, len(dataset), world_size(run))
    module = DiffusionModule(
        tokenizer,
        text_encoder,
        denoiser,
        noise_process,
        vae,
        optim_config(run, steps),
        caption_dropout=model.caption_dropout,
        seed=run.seed,
        captioner=captioner,
        cycle=model.cycle,
    )
    callbacks: list[L.Callback] = [Export(out / "model", export_pipeline, run.export_every)]
    if run.sample_every:
        callbacks.append(SampleGrid(model.sample_prompts, out / "samples", run.sample_every, seed=run.seed))
    trainer = fit(module, dataset, run, steps, data.num_workers, callbacks)
    if trainer.is_global_zero:
        export_atomically(export_pipeline, module, out / "model")
    return out / "model"


def build_text_encoder(model: ModelOptions, tokenizer: Tokenizer) -> TextEncoder:
    return TextEncoder(
        TextEncoderConfig(
            vocab_size=tokenizer.vocab_size,
            max_length=tokenizer.max_length,
            width=model.text_width,
            layers=model.text_layers,
            heads=model.text_heads,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def load_initial_pipeline(model: ModelOptions, image_size: int) -> Text2ImagePipeline:
    """The exported pipeline named by ``--init-from``, checked against the image size."""
    if model.vae:
        raise ValueError("--init-from brings its own VAE (and tokenizer and noise process): drop --vae")
    path = resolve_model_dir(model.init_from)
    pipe = Text2ImagePipeline.from_pretrained(path)
    pipe.text_encoder.train(), pipe.denoiser.train()  # loaded for inference, in eval mode
    size = pipe.denoiser.config.sample_size * pipe.latent_factor
    if size != image_size:
        raise ValueError(f"the model in {path} makes {size}px images but --image-size is {image_size}")
    log.info("starting from %s (its backbone, noise process, tokenizer and VAE are used)", path)
    return pipe


def load_captioner(path: str, image_size: int) -> CaptionPipeline:
    """The exported caption pipeline of the cycle loss (with its own tokenizer), checked against the image size."""
    model_dir = resolve_model_dir(path)
    pipe = CaptionPipeline.from_pretrained(model_dir)
    if pipe.image_size != image_size:
        raise ValueError(
            f"the captioner in {model_dir} reads {pipe.image_size}px images but --image-size is {image_size}"
        )
    return pipe


def export_pipeline(module: DiffusionModule, path: Path) -> None:
    module.to_pipeline().save_pretrained(path)


# --------------------------------------------------------------------------- captioner
def find_tokenizer(path: str | Path) -> Path:
    """A tokenizer folder: ``path`` itself, ``path/tokenizer`` or ``path/model/tokenizer``."""
    path = Path(path)
    for candidate in (path, path / "tokenizer", path / "model" / "tokenizer"):
        if (candidate / TOKENIZER_NAME).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    raise FileNotFoundError(f"{path} holds no tokenizer (no {TOKENIZER_NAME} in it, in tokenizer/ or model/tokenizer/)")


def captioner_tokenizer(out: Path, captions: list[str], options: CaptionerOptions) -> Tokenizer:
    """The run's tokenizer: a copy of ``options.tokenizer``, or one trained on the captions.

    A resumed run must keep the tokenizer it started with: a different ``--tokenizer`` is refused.
    """
    if not options.tokenizer:
        return prepare_tokenizer(out, captions, options.vocab_size, options.max_length)
    if options.max_length is not None:
        raise ValueError("--max-length comes with the tokenizer given by --tokenizer: drop one of them")
    tokenizer = Tokenizer.from_pretrained(find_tokenizer(options.tokenizer))
    own = out / "tokenizer"
    if (own / TOKENIZER_NAME).is_file():
        previous = Tokenizer.from_pretrained(own)
        if previous.backend.to_str() != tokenizer.backend.to_str() or previous.config != tokenizer.config:
            raise ValueError(f"{out} was started with another tokenizer than {options.tokenizer}; use a new --out")
    tokenizer.save_pretrained(own)
    return tokenizer


def build_captioner(options: CaptionerOptions, tokenizer: Tokenizer, image_size: int) -> Captioner:
    """A captioner of a named size for ``tokenizer``; the patch size defaults to image_size / 8."""
    if options.size not in CAPTIONER_SIZES:
        raise ValueError(f"unknown captioner size {options.size!r}; choose from {', '.join(CAPTIONER_SIZES)}")
    return Captioner(
        CaptionerConfig(
            image_size=image_size,
            patch_size=options.patch_size or max(1, image_size // 8),
            **CAPTIONER_SIZES[options.size],
            vocab_size=tokenizer.vocab_size,
            max_length=tokenizer.max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def train_captioner(data: DataOptions, run: RunOptions, options: CaptionerOptions | None = None) -> Path:
    """Train an image captioner and export it (with its tokenizer) to ``OUT/model``.

    With ``options.holdout`` the last N images are kept out of training, and exact match and token
    accuracy on them are logged and written to ``OUT/eval.json``.
    """
    options = options or CaptionerOptions()
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    write_options(out, data=data, run=run, captioner=options)
    L.seed_everything(run.seed, verbose=False)
    images = load_images(data)
    n_train = len(images) - options.holdout
    if options.holdout < 0 or n_train < 1:
        raise ValueError(f"--holdout {options.holdout} leaves no training images out of {len(images)}")
    train_set: Dataset = Subset(images, range(n_train)) if options.holdout else images
    tokenizer = captioner_tokenizer(out, images.captions[:n_train], options)
    captioner = build_captioner(options, tokenizer, data.image_size)
    steps = total_steps(run, n_train, world_size(run))
    module = CaptionerModule(tokenizer, captioner, optim_config(run, steps), seed=run.seed)
    callbacks: list[L.Callback] = [Export(out / "model", export_captioner, run.export_every)]
    trainer = fit(module, train_set, run, steps, data.num_workers, callbacks)
    if trainer.is_global_zero:
        export_atomically(export_captioner, module, out / "model")
        if options.holdout:
            held_out = Subset(images, range(n_train, len(images)))
            scores = evaluate_captioner(module.to_pipeline(), held_out, num_beams=options.num_beams)
            write_json(out / "eval.json", scores.to_json())
            true_of_image = "" if scores.shapes_correct is None else f", true of the image {scores.shapes_correct:.3f}"
            log.info(
                "held-out captions (%d images): exact match %.3f, token accuracy %.3f%s",
                scores.count,
                scores.exact_match,
                scores.token_accuracy,
                true_of_image,
            )
    return out / "model"


def export_captioner(module: CaptionerModule, path: Path) -> None:
    module.to_pipeline().save_pretrained(path)
