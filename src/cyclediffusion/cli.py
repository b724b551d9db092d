"""The ``cyclediffusion`` command: a thin layer that parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("cyclediffusion")


class UsageError(Exception):
    """Bad input from the user: reported in one line with exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add ``--some-flag`` with the seeds' ``--some_flag`` spelling as an alias."""
    names = [name] + ([name.replace("-", "_").replace("__", "--", 1)] if "-" in name[2:] else [])
    parser.add_argument(*names, **kwargs)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return value


def devices_arg(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


# --------------------------------------------------------------------------- argument groups
def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    flag(g, "--data", required=True, help="imagefolder path (images + metadata.jsonl/csv) or a hub dataset name")
    flag(g, "--image-size", type=positive_int, default=32, help="centre-crop size in pixels (default 32)")
    flag(g, "--split", default="train", help="dataset split (hub datasets)")
    flag(g, "--cache-dir", default=None, help="datasets cache folder (hub datasets)")
    flag(g, "--subset-size", type=int, default=None, help="use only the first N examples (0: all)")
    flag(g, "--caption-column", default="text", help="caption column (default: text)")
    flag(g, "--image-column", default="image", help="image column of hub datasets (default: image)")
    flag(g, "--num-workers", type=int, default=0, help="data loader worker processes")


def add_run_flags(p: argparse.ArgumentParser, lr: float = 1e-3) -> None:
    g = p.add_argument_group("run")
    flag(g, "--out", required=True, help="run folder: model/, checkpoints/, logs/, samples/")
    flag(g, "--steps", type=positive_int, default=None, help="optimiser steps")
    flag(g, "--epochs", type=float, default=None, help="epochs (instead of --steps)")
    flag(g, "--minutes", type=float, default=None, help="wall-time budget (alone or as a cap)")
    flag(g, "--batch-size", type=positive_int, default=64, help="batch size per device (default 64)")
    flag(g, "--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    flag(g, "--wd", type=float, default=0.0, help="AdamW weight decay")
    flag(g, "--warmup", type=int, default=100, help="linear LR warmup steps")
    flag(g, "--lr-schedule", choices=["constant", "cosine"], default="constant", help="after warmup")
    flag(g, "--precision", choices=["32", "bf16-mixed", "16-mixed", "32-true"], default="32")
    flag(g, "--accumulate", type=positive_int, default=1, help="gradient accumulation steps")
    flag(g, "--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    flag(g, "--devices", type=devices_arg, default=1, help="number of devices (or 'auto')")
    flag(g, "--accelerator", default="auto", help="auto, cpu, gpu ...")
    flag(g, "--strategy", default="auto", help="auto, ddp, ddp_spawn ...")
    flag(g, "--seed", type=int, default=0)
    flag(g, "--ema-decay", type=float, default=0.999, help="EMA decay (0: no EMA)")
    flag(g, "--log-every", type=positive_int, default=25, help="log metrics every N steps")
    flag(g, "--checkpoint-every", type=int, default=500, help="resume checkpoint every N steps")
    flag(g, "--export-every", type=int, default=0, help="export the model every N steps (always at the end)")
    flag(g, "--sample-every", type=int, default=0, help="sample grid of fixed prompts every N steps")
    flag(g, "--no-resume", action="store_true", help="start afresh even if OUT holds a checkpoint")
    flag(g, "--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt (the default)")


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (device lists, tips) out of the user's terminal.

    Lightning sets its loggers to INFO when imported, so this runs after the import.
    """
    import warnings

    import lightning  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


def data_options(args: argparse.Namespace, cache_latents: bool = False):
    from .training import DataOptions

    quiet_lightning()

    return DataOptions(
        data=args.data,
        image_size=args.image_size,
        split=args.split,
        cache_dir=args.cache_dir,
        subset_size=args.subset_size or None,
        caption_column=args.caption_column,
        image_column=args.image_column,
        num_workers=args.num_workers,
        cache_latents=cache_latents,
    )


def run_options(args: argparse.Namespace):
    from .training import RunOptions

    if args.resume and args.no_resume:
        raise UsageError("--resume and --no-resume contradict each other")
    return RunOptions(
        out=args.out,
        steps=args.steps,
        epochs=args.epochs,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        wd=args.wd,
        warmup=args.warmup,
        lr_schedule=args.lr_schedule,
        precision=args.precision,
        accumulate=args.accumulate,
        grad_clip=args.grad_clip or None,
        devices=args.devices,
        accelerator=args.accelerator,
        strategy=args.strategy,
        seed=args.seed,
        ema_decay=args.ema_decay or None,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        export_every=args.export_every,
        sample_every=args.sample_every,
        resume=not args.no_resume,
    )


# --------------------------------------------------------------------------- commands
def cmd_data(args: argparse.Namespace) -> None:
    from .data.shapes import ShapesConfig, write_imagefolder

    config = ShapesConfig(size=args.size, holdout=tuple(args.holdout))
    path = write_imagefolder(args.out, args.n, config, seed=args.seed)
    print(f"wrote {args.n} images and metadata.jsonl to {path}")


def cmd_train_vae(args: argparse.Namespace) -> None:
    from .training import train_vae

    path = train_vae(
        data_options(args),
        run_options(args),
        size=args.vae_size,
        downsample=args.downsample,
        kl_weight=args.kl_weight,
    )
    print(f"VAE exported to {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from .training import ModelOptions, train_text2image

    model = ModelOptions(
        backbone=args.backbone,
        model_size=args.model_size,
        scheduler=args.scheduler,
        prediction_type=args.prediction_type,
        beta_schedule=args.beta_schedule,
        snr_gamma=args.snr_gamma,
        vae=args.vae,
        caption_dropout=args.caption_dropout,
        text_width=args.text_width,
        text_layers=args.text_layers,
        vocab_size=args.vocab_size,
        max_length=args.max_length,
        **({"sample_prompts": args.sample_prompt} if args.sample_prompt else {}),
        init_from=args.init_from,
        captioner=args.captioner,
        cycle=cycle_config(args),
    )
    path = train_text2image(data_options(args, cache_latents=args.cache_latents), run_options(args), model)
    print(f"model exported to {path}")


def cycle_config(args: argparse.Namespace):
    from .training import CycleConfig

    names = ("weight", "t_max", "every", "fraction", "mode", "k", "sample_steps")
    given = {name: getattr(args, f"cycle_{name}") for name in names if getattr(args, f"cycle_{name}") is not None}
    if given and not args.captioner:
        raise UsageError("the --cycle-* flags need --captioner")
    return CycleConfig(**given)


def cmd_train_captioner(args: argparse.Namespace) -> None:
    from .training import CaptionerOptions, train_captioner

    options = CaptionerOptions(
        size=args.captioner_size,
        patch_size=args.patch_size,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        max_length=args.max_length,
        holdout=args.holdout,
        num_beams=args.beams,
    )
    path = train_captioner(data_options(args), run_options(args), options)
    print(f"captioner exported to {path}")


def cmd_caption(args: argparse.Namespace) -> None:
    from .pipelines.caption import CaptionPipeline
    from .pipelines.storage import resolve_model_dir

    pipe = CaptionPipeline.from_pretrained(resolve_model_dir(args.model), device=pick_device(args.device))
    images = [open_image(path) for path in args.image]
    captions = pipe(images, num_beams=args.beams, max_length=args.max_length).captions
    for path, caption in zip(args.image, captions):
        print(caption if len(captions) == 1 else f"{path}: {caption}")


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from .pipelines import Text2ImagePipeline
    from .pipelines.storage import resolve_model_dir

    pipe = Text2ImagePipeline.from_pretrained(resolve_model_dir(args.model), device=pick_device(args.device))
    prompts = args.prompt
    n = args.num_images
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts) * n)]
    images = pipe(
        prompts,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=n,
        generator=generators,
        sampler=args.sampler,
        eta=args.eta,
        output_type="pt",
    ).images
    write_images(images, Path(args.out), nrow=n if len(prompts) > 1 else min(8, n), scale=args.scale)


def write_images(images, out: Path, nrow: int, scale: int = 1) -> None:
    """One PNG, or a grid at ``out`` and each image beside it (``out_0.png``, ...)."""
    from .images import make_grid, save_image

    if len(images) == 1:
        save_image(images[0], out, scale=scale)
    else:
        save_image(make_grid(images, nrow=nrow), out, scale=scale)
        for i, image in enumerate(images):
            save_image(image, out.with_name(f"{out.stem}_{i}{out.suffix}"), scale=scale)
    print(f"wrote {out}" + (f" and {len(images)} single images beside it" if len(images) > 1 else ""))


def open_image(path: str):
    """An RGB PIL image, or a user error naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError as err:
        raise ValueError(f"{path} is not an image PIL can read") from err


def edit_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the edit pipelines from the shared flags."""
    import torch

    n = args.num_images * len(args.prompt or [""])
    return dict(
        strength=args.strength,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        source_guidance_scale=args.source_guidance,
        eta=args.eta,
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator().manual_seed(args.seed + i) for i in range(n)],
        method=args.method,
        output_type="pt",
    )


def cmd_edit(args: argparse.Namespace) -> None:
    from .pipelines import CycleDiffusionPipeline

    image = open_image(args.image)
    pipe = CycleDiffusionPipeline.from_pretrained(args.model, device=pick_device(args.device))
    images = pipe(args.prompt, args.source_prompt, image, **edit_options(args)).images
    write_images(images, Path(args.out), nrow=args.num_images, scale=args.scale)


def cmd_translate(args: argparse.Namespace) -> None:
    from .pipelines import CycleDiffusionPipeline, translate

    image = open_image(args.image)
    device = pick_device(args.device)
    source = CycleDiffusionPipeline.from_pretrained(args.source_model, device=device)
    target = CycleDiffusionPipeline.from_pretrained(args.target_model, device=device)
    prompt = args.prompt or [args.source_prompt]
    images = translate(image, source, target, args.source_prompt, prompt, **edit_options(args)).images
    write_images(images, Path(args.out), nrow=args.num_images, scale=args.scale)


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .eval import build_suite, evaluate_pipeline
    from .pipelines import Text2ImagePipeline
    from .pipelines.storage import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    pipe = Text2ImagePipeline.from_pretrained(model_dir, device=pick_device(args.device))
    suite = build_suite(per_kind=args.per_kind, held_out=tuple(args.held_out))
    report = evaluate_pipeline(
        pipe,
        suite,
        samples_per_prompt=args.samples_per_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
    )
    out = Path(args.out) if args.out else model_dir.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "shapes_eval.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    report.save_failure_grid(out / "failures.png")
    print(report.table())
    print(f"wrote {out / 'shapes_eval.json'} and {out / 'failures.png'}")


def cmd_eval_vae(args: argparse.Namespace) -> None:
    import json

    from .eval import evaluate_vae, find_vae_dir, holdout_subset, load_vae

    if not 0 < args.holdout <= 1:
        raise UsageError(f"--holdout must be in (0, 1], got {args.holdout}")
    vae_dir = find_vae_dir(args.model)
    vae = load_vae(vae_dir, device=pick_device(args.device))
    if args.image_size % vae.downsample_factor:
        raise UsageError(f"--image-size {args.image_size} is not a multiple of the VAE's {vae.downsample_factor}")
    options = data_options(args)

    from .training.data import load_captioned_images  # after data_options: it quiets Lightning

    images = load_captioned_images(
        options.data,
        options.image_size,
        split=options.split,
        cache_dir=options.cache_dir,
        subset_size=options.subset_size,
        caption_column=options.caption_column,
        image_column=options.image_column,
    )
    report = evaluate_vae(vae, holdout_subset(images, args.holdout), batch_size=args.batch_size, seed=args.seed)
    in_pipeline = vae_dir.name == "vae" and (vae_dir.parent / "model_index.json").is_file()
    out = Path(args.out) if args.out else (vae_dir.parent.parent if in_pipeline else vae_dir.parent) / "eval"
    out = out if out.suffix == ".json" else out / "vae_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(vae_dir), "data": options.data, **report.to_json()}, indent=2) + "\n")
    print(report.table())
    print(f"wrote {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    quiet_lightning()

    report = run_demo(
        out=args.out,
        minutes=args.minutes,
        backbone=args.backbone,
        model_size=args.model_size,
        lr=args.lr,
        seed=args.seed,
        n=args.n,
    )
    print(f"report: {report}")


def pick_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- parser
def build_parser() -> Parser:
    parser = Parser(prog="cyclediffusion", description="Train text-to-image diffusion models and edit images.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("demo", help="shapes data -> VAE -> text-to-image model -> samples and report")
    flag(p, "--out", default="runs/demo")
    flag(p, "--minutes", type=float, default=10.0, help="total budget (default 10)")
    flag(p, "--backbone", choices=["unet", "dit"], default="unet")
    flag(p, "--model-size", default="small", help="denoiser size (see train --model-size)")
    flag(p, "--lr", type=float, default=1e-3)
    flag(p, "--n", type=positive_int, default=20000, help="number of training images")
    flag(p, "--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="write a built-in dataset as an imagefolder")
    p.add_argument("kind", choices=["shapes"])
    flag(p, "--out", required=True)
    flag(p, "--n", type=positive_int, default=20000)
    flag(p, "--size", type=positive_int, default=32)
    flag(p, "--seed", type=int, default=0)
    flag(p, "--holdout", action="append", default=[], help="colour-shape pair never drawn, e.g. 'purple triangle'")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train-vae", help="train the KL autoencoder and measure its latent scaling")
    add_data_flags(p)
    add_run_flags(p, lr=1e-3)
    flag(p, "--vae-size", choices=["tiny", "small", "base"], default="tiny")
    flag(p, "--downsample", type=int, choices=[2, 4, 8], default=4, help="spatial downsampling (default 4)")
    flag(p, "--kl-weight", type=float, default=1e-4)
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("train", help="train a text-to-image model (text encoder + denoiser)")
    add_data_flags(p)
    add_run_flags(p, lr=1e-3)
    g = p.add_argument_group("model")
    flag(g, "--backbone", choices=["unet", "dit"], default="unet")
    flag(g, "--model-size", default="small", help="unet: tiny|small|medium|base; dit: tiny|small|DiT-S/2|...")
    flag(g, "--scheduler", choices=["ddpm", "flow"], default="ddpm", help="noise process")
    flag(g, "--prediction-type", choices=["epsilon", "x0", "v_prediction"], default="v_prediction")
    flag(g, "--beta-schedule", choices=["linear", "scaled_linear", "cosine"], default="cosine")
    flag(
        g,
        "--snr-gamma",
        type=non_negative_float,
        default=5.0,
        help="ddpm: min-SNR-gamma loss weighting (Hang et al. 2023), default 5; 0 turns it off",
    )
    flag(g, "--vae", default=None, help="trained VAE (run folder or model folder); pixel space without it")
    flag(g, "--cache-latents", action="store_true", help="encode the dataset once with the VAE")
    flag(g, "--caption-dropout", type=float, default=0.1, help="probability of the empty caption")
    flag(g, "--text-width", type=positive_int, default=128)
    flag(g, "--text-layers", type=positive_int, default=2)
    flag(g, "--vocab-size", type=positive_int, default=1024)
    flag(g, "--max-length", type=positive_int, default=None, help="token length (default: fit the captions)")
    flag(g, "--sample-prompt", action="append", default=[], help="prompt for the sample grids (repeatable)")
    flag(g, "--init-from", default=None, help="start from an exported pipeline (run or model folder): fine-tuning")
    g = p.add_argument_group("cycle loss (a frozen captioner reads the caption back from the model's image)")
    flag(g, "--captioner", default=None, help="trained captioner (train-captioner run or model folder)")
    flag(g, "--cycle-weight", type=float, default=None, help="weight of the captioner's loss (default 0.1)")
    flag(g, "--cycle-t-max", type=float, default=None, help="noise below this time (ddpm: T/5 steps, flow: 0.2)")
    flag(g, "--cycle-every", type=positive_int, default=None, help="add the term every K optimiser steps")
    flag(g, "--cycle-fraction", type=float, default=None, help="share of the batch given the term (default 0.25)")
    flag(
        g,
        "--cycle-mode",
        choices=["x0", "last-k"],
        default=None,
        help="x0 (default): one-step estimate at low noise; last-k: draw from noise, gradient through the last k steps",
    )
    flag(g, "--cycle-k", type=positive_int, default=None, help="last-k: sampler steps with gradient (default 2)")
    flag(g, "--cycle-sample-steps", type=positive_int, default=None, help="last-k: sampler steps in all (default 10)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-captioner", help="train an image captioner (for the cycle loss, or on its own)")
    add_data_flags(p)
    add_run_flags(p, lr=5e-4)
    g = p.add_argument_group("captioner")
    flag(g, "--captioner-size", choices=["tiny", "small", "base"], default="small")
    flag(g, "--patch-size", type=positive_int, default=None, help="pixels per patch side (default: image size / 8)")
    flag(g, "--tokenizer", default=None, help="reuse a tokenizer: its folder, or a text-to-image run or model folder")
    flag(g, "--vocab-size", type=positive_int, default=1024, help="vocabulary of a tokenizer trained here")
    flag(g, "--max-length", type=positive_int, default=None, help="token length (default: fit the captions)")
    flag(g, "--holdout", type=int, default=0, help="keep the last N images out of training; score captions on them")
    flag(g, "--beams", type=positive_int, default=1, help="beam width of the held-out captions")
    p.set_defaults(func=cmd_train_captioner)

    p = sub.add_parser("caption", help="caption images with a trained captioner")
    flag(p, "--model", required=True, help="train-captioner run folder or model folder")
    flag(p, "--image", action="append", required=True, help="image file (repeatable)")
    flag(p, "--beams", type=positive_int, default=1, help="beam search width (1: greedy)")
    flag(p, "--max-length", type=positive_int, default=None, help="longest caption in tokens")
    flag(p, "--device", default="auto")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("eval", help="ShapesEval: does the model draw what the caption says? (offline, exact)")
    flag(p, "--model", required=True, help="run folder or model folder trained on the shapes world")
    flag(p, "--samples-per-prompt", type=positive_int, default=4)
    flag(p, "--per-kind", type=positive_int, default=20, help="prompts per category of the suite")
    flag(p, "--held-out", action="append", default=[], help="colour-shape pair held out of training")
    flag(p, "--steps", type=positive_int, default=25)
    flag(p, "--guidance", type=float, default=3.0)
    flag(p, "--seed", type=int, default=0)
    flag(p, "--device", default="auto")
    flag(p, "--out", default=None, help="folder for shapes_eval.json and failures.png (default: RUN/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-vae", help="VAE reconstruction (PSNR, SSIM) and latent statistics on images")
    flag(p, "--model", required=True, help="VAE folder, train-vae run folder, or a pipeline / run with a vae/")
    add_data_flags(p)
    flag(
        p,
        "--holdout",
        type=float,
        default=1.0,
        help="evaluate only the last fraction of the images, e.g. those a train-vae --subset-size run never saw "
        "(default 1: all, for a separate held-out folder)",
    )
    flag(p, "--batch-size", type=positive_int, default=64)
    flag(p, "--seed", type=int, default=0, help="seed of the posterior samples behind the measured scaling")
    flag(p, "--device", default="auto")
    flag(p, "--out", default=None, help="JSON file or folder (default: RUN/eval/vae_eval.json)")
    p.set_defaults(func=cmd_eval_vae)

    p = sub.add_parser("sample", help="generate images from a trained model")
    flag(p, "--model", required=True, help="run folder or model folder")
    flag(p, "--prompt", action="append", required=True, help="prompt (repeatable)")
    flag(p, "--negative-prompt", default=None)
    flag(p, "--steps", type=positive_int, default=50)
    flag(p, "--guidance", type=float, default=4.0)
    flag(p, "--sampler", choices=["ddim", "ddpm", "euler", "heun"], default=None)
    flag(p, "--eta", type=float, default=0.0)
    flag(p, "--seed", type=int, default=0)
    flag(p, "--num-images", type=positive_int, default=1)
    flag(p, "--scale", type=positive_int, default=1, help="enlarge the PNG (nearest neighbour)")
    flag(p, "--device", default="auto")
    flag(p, "--out", default="sample.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", help="CycleDiffusion: edit an image by changing its caption")
    flag(p, "--model", required=True, help="run folder, model folder, or a diffusers Stable Diffusion folder")
    flag(p, "--source-prompt", required=True, help="what the image shows")
    flag(p, "--prompt", action="append", required=True, help="what it should show (repeatable)")
    add_edit_flags(p, guidance=2.0)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("translate", help="unpaired translation between two models sharing a VAE (CycleDiffusion)")
    flag(p, "--source-model", required=True, help="model of the image's domain")
    flag(p, "--target-model", required=True, help="model of the domain to translate to")
    flag(p, "--source-prompt", default="", help="caption under the source model (default: empty)")
    flag(p, "--prompt", action="append", default=None, help="caption under the target model (default: the source's)")
    add_edit_flags(p, guidance=1.0)
    p.set_defaults(func=cmd_translate)
    return parser


def add_edit_flags(p: argparse.ArgumentParser, guidance: float) -> None:
    from .pipelines.cycle import METHODS

    flag(p, "--image", required=True, help="input image")
    flag(p, "--method", choices=list(METHODS), default="cycle", help="cycle (default), sdedit or ddim_inversion")
    flag(p, "--strength", type=float, default=0.8, help="how far into the chain to start, in [0, 1] (default 0.8)")
    flag(p, "--eta", type=float, default=0.1, help="DDIM stochasticity, > 0 for cycle (default 0.1)")
    flag(p, "--guidance", type=float, default=guidance, help=f"guidance of the target chain (default {guidance:g})")
    flag(p, "--source-guidance", type=float, default=1.0, help="guidance of the source chain (default 1)")
    flag(p, "--steps", type=positive_int, default=100, help="steps of the full chain (default 100)")
    flag(p, "--seed", type=int, default=0)
    flag(p, "--num-images", type=positive_int, default=1, help="edits per prompt")
    flag(p, "--scale", type=positive_int, default=1, help="enlarge the PNG (nearest neighbour)")
    flag(p, "--device", default="auto")
    flag(p, "--out", default="edited.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cyclediffusion`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user's mistakes, a traceback for ours
        if args.debug or not is_user_error(err):
            raise
        print(f"cyclediffusion: error: {err}", file=sys.stderr)
        return 2
    return 0


def is_user_error(err: Exception) -> bool:
    from .pipelines import NotAPipelineError

    user_errors = (
        UsageError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        NotAPipelineError,
        ValueError,
        ConnectionError,
    )
    return isinstance(err, user_errors)


if __name__ == "__main__":
    sys.exit(main())
