"""Training runs: build the data, the models and Lightning's Trainer from options, then fit and export.

A run folder holds everything::

    OUT/model/          the exported inference model (safetensors + JSON), EMA weights
    OUT/checkpoints/    last.ckpt: Lightning's resume state (never handed to users as a model)
    OUT/logs/           TensorBoard events and metrics.jsonl
    OUT/samples/        sample grids of the fixed prompts
    OUT/options.yaml    the resolved options of the run (``--config OUT/options.yaml`` runs it again)

A captioner run (:func:`train_captioner`) exports a caption pipeline to ``OUT/model`` and, with a
held-out share of the images, writes its scores to ``OUT/eval.json``. The networks come from
:mod:`cyclediffusion.recipes`; the options are those of :mod:`.options`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import write_json
from ..eval.caption_eval import evaluate_captioner
from ..models import AutoencoderKL, DiT, UNet
from ..models.vae import measure_latent_scaling
from ..options import to_plain
from ..pipelines import Text2ImagePipeline
from ..pipelines.caption import CaptionPipeline
from ..pipelines.storage import INDEX_NAME, find_pipeline, resolve_model_dir
from ..pipelines.text2image import GUIDE_FOLDER
from ..precision import choose_precision
from ..recipes import build_captioner, build_vae
from .callbacks import (
    EMA,
    Export,
    ExportAt,
    MetricsFile,
    ResumeCheckpoint,
    RunProgressBar,
    SampleGrid,
    Throughput,
    export_atomically,
)
from .data import collate, load_images
from .distill import DistillModule
from .latents import latent_dataset
from .modules import CaptionerModule, DiffusionModule, OptimConfig, VAEModule
from .options import CaptionerOptions, DataOptions, DistillOptions, ModelOptions, RunOptions, VAEOptions
from .repa import FrozenEncoder
from .sampler import StepBatchSampler, StepIndexed
from .streaming import CaptionedStream
from .tokenizers import captioner_tokenizer, prepare_tokenizer

log = logging.getLogger("cyclediffusion")
OPTIONS_NAME = "options.yaml"


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (device lists, tips) out of the user's terminal.

    Lightning sets its loggers to INFO when imported, so this runs after the import.
    """
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


quiet_lightning()


# --------------------------------------------------------------------------- shared plumbing
def total_steps(run: RunOptions, dataset_size: int | None, world: int) -> int | None:
    """Optimiser steps from ``--steps`` or ``--epochs`` (None: only a time budget; a stream has no size)."""
    if run.steps:
        return run.steps
    if run.epochs and dataset_size is None:
        raise ValueError("--epochs needs a dataset of known size; a stream takes --steps or --minutes")
    if run.epochs:
        per_epoch = dataset_size // (run.batch_size * world * run.accumulate)
        return max(1, math.ceil(run.epochs * per_epoch))
    return None


def world_size(run: RunOptions) -> int:
    """Processes the run will use on all its machines (for global batch sizes before the Trainer exists)."""
    return processes_per_node(run) * run.num_nodes


def processes_per_node(run: RunOptions) -> int:
    """Processes the run will use on this machine; more than the machine has is a ``ValueError``."""
    on_cpu = run.accelerator == "cpu" or not torch.cuda.is_available()
    available = (os.cpu_count() or 1) if on_cpu else torch.cuda.device_count()
    if isinstance(run.devices, int) and run.devices > 0:
        if run.devices > available:
            what = f"{available} CPU cores" if on_cpu else f"{available} GPUs"
            raise ValueError(f"--devices {run.devices}: this machine has {what}")
        return run.devices
    if on_cpu:
        return 1
    return available if str(run.devices) in ("auto", "-1") else len(str(run.devices).split(","))


def dataset_size(dataset: Dataset | CaptionedStream) -> int | None:
    """The number of items, None for a stream."""
    return None if isinstance(dataset, CaptionedStream) else len(dataset)  # type: ignore[arg-type]


def make_loader(
    dataset: Dataset | CaptionedStream, run: RunOptions, trainer: L.Trainer, num_workers: int
) -> DataLoader:
    """The step-keyed loader; it starts where the (possibly resumed) trainer stands."""
    start_step = trainer.global_step * run.accumulate
    if isinstance(dataset, CaptionedStream):
        batches = dataset.batch_sampler(run.batch_size, trainer.world_size, trainer.global_rank, run.seed, start_step)
        return DataLoader(
            dataset.rows, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
    sampler = StepBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        run.batch_size,
        trainer.world_size,
        trainer.global_rank,
        run.seed,
        start_step=start_step,
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
    dataset: Dataset | CaptionedStream,
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
    if run.progress:
        all_callbacks.append(RunProgressBar(steps, run.minutes))
    precision, why = choose_precision(run.precision, run.accelerator)
    log.info("precision %s (%s)", precision, why)
    trainer = L.Trainer(
        max_steps=steps if steps is not None else -1,
        max_time={"minutes": run.minutes} if run.minutes else None,
        max_epochs=-1,
        accelerator=run.accelerator,
        devices=run.devices,
        num_nodes=run.num_nodes,
        strategy=run.strategy,
        precision=precision,
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


def start_run(run: RunOptions, **sections: Any) -> Path:
    """Create ``OUT``, write the resolved options to ``OUT/options.yaml`` and seed everything; returns ``OUT``."""
    import yaml

    processes_per_node(run)  # refuse more devices than the machine has before anything is written
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    plain = {name: to_plain(value) for name, value in {**sections, "run": run}.items()}
    order = ["data", "run", *[k for k in plain if k not in ("data", "run")]]
    text = yaml.safe_dump({k: plain[k] for k in order if k in plain}, sort_keys=False)
    precision, why = choose_precision(run.precision, run.accelerator)
    (out / OPTIONS_NAME).write_text(f"{text}# precision {run.precision} -> {precision} ({why})\n")
    L.seed_everything(run.seed, verbose=False)
    return out


def optim_config(run: RunOptions, steps: int | None) -> OptimConfig:
    return OptimConfig(
        lr=run.lr,
        weight_decay=run.wd,
        warmup_steps=run.warmup,
        schedule=run.lr_schedule,
        total_steps=steps,
        timed=bool(run.minutes),
        optimizer=run.optimizer,
    )


def save_pipeline(module: DiffusionModule | CaptionerModule, path: Path, guide: Path | None = None) -> None:
    """Export a module's inference pipeline (the EMA weights when the callback hands those in); with ``guide``, a
    folder that holds a saved text-to-image pipeline by now, that model goes with it as its autoguidance model."""
    pipe = module.to_pipeline()
    if guide is not None and (guide / INDEX_NAME).is_file():
        pipe.guide = pipe.check_guide(Text2ImagePipeline.from_pretrained(guide))
    pipe.save_pretrained(path)


# --------------------------------------------------------------------------- VAE
def train_vae(
    data: DataOptions, run: RunOptions, vae: VAEOptions | None = None, callbacks: Sequence[L.Callback] = ()
) -> Path:
    """Train a KL VAE, measure its latent scaling on the data, and export it to ``OUT/model``. ``callbacks`` join the
    run's own (e.g. a :class:`~.callbacks.StopWhen` on a reconstruction score)."""
    options = vae or VAEOptions()
    out = start_run(run, data=data, vae=options)
    dataset = load_images(data)
    model = build_vae(options.size, options.downsample, options.latent_channels)
    steps = total_steps(run, dataset_size(dataset), world_size(run))
    module = VAEModule(model, optim_config(run, steps), kl_weight=options.kl_weight, seed=run.seed)
    trainer = fit(module, dataset, run, steps, data.num_workers, list(callbacks))
    if trainer.is_global_zero:
        export_atomically(lambda m, p: export_vae(m.vae, dataset, p), module, out / "model")
    return out / "model"


def export_vae(vae: AutoencoderKL, dataset: Dataset | CaptionedStream, path: Path, batches: int = 16) -> None:
    """Measure ``scaling_factor`` / ``shift_factor`` on (part of) the data, then save the VAE."""
    vae.eval()
    device = next(vae.parameters()).device
    if isinstance(dataset, CaptionedStream):  # the first rows of the stream
        dataset = dataset.first_items(batches * 64)
    loader = DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=collate)
    images = (batch["pixels"].to(device) for _, batch in zip(range(batches), loader))
    scale, shift = measure_latent_scaling(vae, images)
    vae.config.scaling_factor, vae.config.shift_factor = scale, shift
    log.info("VAE latent scaling factor %.4f, shift %.4f", scale, shift)
    vae.save_pretrained(path)


# --------------------------------------------------------------------------- text-to-image
def train_text2image(
    data: DataOptions, run: RunOptions, model: ModelOptions, callbacks: Sequence[L.Callback] = ()
) -> Path:
    """Train a text encoder and denoiser jointly (latent space with ``model.vae``, else pixels); export to OUT/model.

    With ``model.init_from`` training starts from an exported pipeline; with ``model.captioner`` the
    step adds the cycle-consistency loss (see :class:`~cyclediffusion.training.options.CycleConfig`).
    ``callbacks`` join the run's own (e.g. a probe of the model every few steps).
    """
    out = start_run(run, data=data, model=model)
    captioner = load_captioner(model.captioner, data.image_size) if model.captioner else None
    images = load_images(data)
    save = save_pipeline
    if model.init_from:
        pipe, save = load_initial_pipeline(model, data.image_size)
        tokenizer, text_encoder, denoiser, vae = pipe.tokenizer, pipe.text_encoder, pipe.denoiser, pipe.vae
        noise_process = pipe.noise_process
    else:
        vae = AutoencoderKL.from_pretrained(resolve_model_dir(model.vae, "config.json")) if model.vae else None
        model.latent_shape(vae, data.image_size)  # a mismatch fails before the tokenizer is trained
        tokenizer = prepare_tokenizer(out, images.captions, model.vocab_size, model.max_length)
        built = model.build(tokenizer, vae, data.image_size)
        text_encoder, denoiser, noise_process = built["text_encoder"], built["denoiser"], built["noise_process"]
    if run.gradient_checkpointing:
        enable_gradient_checkpointing(denoiser)
    dataset = training_set(images, vae, data, run, out)
    steps = total_steps(run, dataset_size(dataset), world_size(run))
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
        guidance_scale=model.guidance_scale,
        immiscible_noise=model.immiscible_noise,
        repa_encoder=FrozenEncoder(model.repa_encoder, vae, captioner) if model.repa_weight > 0 else None,
        repa_weight=model.repa_weight,
        repa_until=model.repa_until,
        captioner_device=model.captioner_device,
        train_text_encoder=model.train_text_encoder,
        self_condition=model.self_condition,
    )
    final = save
    if run.export_guide and save is save_pipeline:  # the model, once its guide is written, carries it
        final = functools.partial(save_pipeline, guide=out / GUIDE_FOLDER)
    own: list[L.Callback] = [Export(out / "model", final, run.export_every)]
    if run.export_guide:
        own.append(ExportAt(out / GUIDE_FOLDER, save, run.export_guide))
    if run.sample_every:
        own.append(SampleGrid(model.sample_prompts, out / "samples", run.sample_every, seed=run.seed))
    trainer = fit(module, dataset, run, steps, data.num_workers, [*own, *callbacks])
    if trainer.is_global_zero:
        export_atomically(final, module, out / "model")
    return out / "model"


def training_set(
    images: Dataset | CaptionedStream, vae: AutoencoderKL | None, data: DataOptions, run: RunOptions, out: Path
) -> Dataset | CaptionedStream:
    """The images, or with ``data.cache_latents`` and a VAE their latents, encoded once into ``OUT``."""
    if not (data.cache_latents and vae is not None):
        return images
    device = torch.device("cuda" if torch.cuda.is_available() and run.accelerator != "cpu" else "cpu")
    return latent_dataset(images, vae, data, out, device)


def check_image_size(pipe: Text2ImagePipeline, image_size: int, path: str | Path) -> None:
    """A ValueError when the pipeline in ``path`` makes images of another size than ``--image-size``."""
    size = pipe.denoiser.sample_size * pipe.latent_factor
    if size != image_size:
        raise ValueError(f"the model in {path} makes {size}px images but --image-size is {image_size}")


def distill_text2image(data: DataOptions, run: RunOptions, options: DistillOptions) -> Path:
    """Distill ``options.teacher`` into a few-step student (:mod:`~.distill`) on the captions and images of
    ``data``; export it to ``OUT/model``, where it samples in ``options.student_steps`` steps without guidance."""
    out = start_run(run, data=data, distill=options)
    path = find_pipeline(options.teacher)
    teacher = Text2ImagePipeline.from_pretrained(path)
    check_image_size(teacher, data.image_size, path)
    dataset = training_set(load_images(data), teacher.vae, data, run, out)
    steps = total_steps(run, dataset_size(dataset), world_size(run))
    module = DistillModule(
        teacher, optim_config(run, steps), options.student_steps, options.teacher_substeps, options.guidance,
        seed=run.seed, start_from=options.start_from, guide_scale=options.guide_scale,
    )  # fmt: skip
    export = Export(out / "model", save_pipeline, run.export_every)
    trainer = fit(module, dataset, run, steps, data.num_workers, [export])
    if trainer.is_global_zero:
        export_atomically(save_pipeline, module, out / "model")
    return out / "model"


def enable_gradient_checkpointing(denoiser: torch.nn.Module) -> None:
    """Switch on gradient checkpointing in ``denoiser``: this project's U-Net and DiT, or a diffusers model inside
    a wrapped Stable Diffusion U-Net (its own ``enable_gradient_checkpointing``)."""
    found = False
    for module in denoiser.modules():
        if isinstance(module, (UNet, DiT)):
            module.gradient_checkpointing = found = True
        elif callable(getattr(module, "enable_gradient_checkpointing", None)):
            module.enable_gradient_checkpointing()
            found = True
    if not found:
        raise ValueError(f"--gradient-checkpointing: {type(denoiser).__name__} has no blocks to checkpoint")


def load_initial_pipeline(model: ModelOptions, image_size: int) -> tuple[Text2ImagePipeline, Callable]:
    """The pipeline named by ``--init-from``, checked against the image size, and how to export its fine-tune.

    A diffusers Stable Diffusion folder is wrapped (:mod:`~cyclediffusion.integrations.diffusers`) and exported
    as a diffusers folder again, with its scheduler config; a pipeline of this project is exported as one."""
    if model.vae:
        raise ValueError("--init-from brings its own VAE (and tokenizer and noise process): drop --vae")
    from ..integrations.diffusers import is_diffusers_pipeline

    save = save_pipeline
    if is_diffusers_pipeline(model.init_from):
        from ..integrations.diffusers import load_stable_diffusion_parts, save_stable_diffusion, wrap_stable_diffusion

        path = Path(model.init_from)
        parts = load_stable_diffusion_parts(path)
        pipe = Text2ImagePipeline(**wrap_stable_diffusion(**parts), guidance_scale=model.guidance_scale)

        def save(module: DiffusionModule, directory: Path) -> None:
            save_stable_diffusion(module.to_pipeline(), parts["scheduler"], directory)
    else:
        path = resolve_model_dir(model.init_from)
        pipe = Text2ImagePipeline.from_pretrained(path)
    pipe.text_encoder.train(), pipe.denoiser.train()  # loaded for inference, in eval mode
    check_image_size(pipe, image_size, path)
    log.info("starting from %s (its backbone, noise process, tokenizer and VAE are used)", path)
    return pipe, save


def load_captioner(path: str, image_size: int) -> CaptionPipeline:
    """The captioner of the cycle loss: an exported caption pipeline (with its own tokenizer), checked against the
    image size, or a transformers Pix2Struct folder (model + processor; any image size)."""
    from ..integrations.pix2struct import is_pix2struct_folder, load_pix2struct

    if is_pix2struct_folder(path):
        return load_pix2struct(path)
    model_dir = resolve_model_dir(path)
    pipe = CaptionPipeline.from_pretrained(model_dir)
    if pipe.image_size != image_size:
        raise ValueError(
            f"the captioner in {model_dir} reads {pipe.image_size}px images but --image-size is {image_size}"
        )
    return pipe


# --------------------------------------------------------------------------- captioner
def train_captioner(data: DataOptions, run: RunOptions, options: CaptionerOptions | None = None) -> Path:
    """Train an image captioner and export it (with its tokenizer) to ``OUT/model``.

    With ``options.holdout`` the last N images are kept out of training, and exact match and token
    accuracy on them are logged and written to ``OUT/eval.json``.
    """
    options = options or CaptionerOptions()
    out = start_run(run, data=data, captioner=options)
    images = load_images(data)
    if isinstance(images, CaptionedStream):
        raise ValueError("train-captioner reads a dataset it can index (its held-out share); give it no stream")
    n_train = len(images) - options.holdout
    if options.holdout < 0 or n_train < 1:
        raise ValueError(f"--holdout {options.holdout} leaves no training images out of {len(images)}")
    train_set: Dataset = Subset(images, range(n_train)) if options.holdout else images
    tokenizer = captioner_tokenizer(out, images.captions[:n_train], options)
    captioner = build_captioner(options.size, tokenizer, data.image_size, options.patch_size)
    steps = total_steps(run, n_train, world_size(run))
    estimates = None
    if options.read_estimates_of:
        estimates = Text2ImagePipeline.from_pretrained(find_pipeline(options.read_estimates_of))
        size = estimates.denoiser.sample_size * estimates.latent_factor
        if size != data.image_size:
            raise ValueError(f"--read-estimates-of makes {size}px images but --image-size is {data.image_size}")
    module = CaptionerModule(
        tokenizer, captioner, optim_config(run, steps), seed=run.seed, estimates=estimates,
        estimate_fraction=options.estimate_fraction,
    )  # fmt: skip
    callbacks: list[L.Callback] = [Export(out / "model", save_pipeline, run.export_every)]
    trainer = fit(module, train_set, run, steps, data.num_workers, callbacks)
    if trainer.is_global_zero:
        export_atomically(save_pipeline, module, out / "model")
        if options.holdout:
            score_captioner(module, Subset(images, range(n_train, len(images))), options.num_beams, out)
    return out / "model"


def score_captioner(module: CaptionerModule, held_out: Dataset, num_beams: int, out: Path) -> None:
    """Caption the held-out images, log the scores and write them to ``OUT/eval.json``."""
    scores = evaluate_captioner(module.to_pipeline(), held_out, num_beams=num_beams)
    write_json(out / "eval.json", scores.to_json())
    true_of_image = "" if scores.shapes_correct is None else f", true of the image {scores.shapes_correct:.3f}"
    log.info(
        "held-out captions (%d images): exact match %.3f, token accuracy %.3f%s",
        scores.count,
        scores.exact_match,
        scores.token_accuracy,
        true_of_image,
    )
