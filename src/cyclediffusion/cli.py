"""The ``cyclediffusion`` command: a thin layer that parses arguments and calls the Python API.

The training commands' flags are built from the option dataclasses of :mod:`cyclediffusion.training.options`
(each option declared once there); the other commands take the defaults of the API functions they call.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .diffusion import flow, gaussian
from .options import add_flags, given_flags, read_config, resolve, spellings
from .pipelines.base import DEFAULT_STEPS, pick_device
from .pipelines.text2image import GUIDE_SCALE
from .precision import cast_pipeline
from .training.options import COMMANDS, RECIPE_DEFAULTS, DataOptions, positive_float, positive_int

log = logging.getLogger("cyclediffusion")
SAMPLER_CHOICES = tuple(dict.fromkeys(gaussian.SAMPLERS + flow.SAMPLERS))  # every noise process's samplers
EVAL_STEPS = 25  # ShapesEval's sampler steps for a model that names none (as the demo's report)


class UsageError(Exception):
    """Bad input from the user: reported in one line with exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add ``--some-flag`` with the seeds' ``--some_flag`` spelling as an alias."""
    parser.add_argument(*spellings(name[2:]), **kwargs)


def api_default(fn: Callable, name: str) -> Any:
    """The default of parameter ``name`` of ``fn``: the CLI takes its defaults from the API it calls."""
    return inspect.signature(fn).parameters[name].default


# --------------------------------------------------------------------------- training commands
def training_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The command's option sections from the defaults, ``--config`` and the flags; None after ``--dry-run``."""
    config = read_config(args.config) if args.config else {}
    options = resolve(COMMANDS[args.command], config, given_flags(args), RECIPE_DEFAULTS.get(args.command))
    if args.dry_run:
        import yaml

        from .options import to_plain

        print(yaml.safe_dump({k: to_plain(v) for k, v in options.items()}, sort_keys=False), end="")
        return None
    return options


def cmd_train(args: argparse.Namespace) -> None:
    from . import training

    run = {"train": training.train_text2image, "train-vae": training.train_vae}
    run["train-captioner"], run["distill"] = training.train_captioner, training.distill_text2image
    options = training_options(args)
    if options is not None:
        path = run[args.command](*options.values())
        print(f"{'VAE' if args.command == 'train-vae' else 'model'} exported to {path}")


def add_training_command(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", default=None, help="YAML or JSON file of options, e.g. a run's options.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the resolved options as YAML and exit")
    for section, cls in COMMANDS[name].items():
        add_flags(p, cls, section, defaults=RECIPE_DEFAULTS.get(name, {}).get(section))
    p.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------- other commands
def kind_weights(text: str) -> dict[str, float]:
    """``single=0.4,pair=0.3`` as a dict of scene-kind weights."""
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {name.strip(): float(weight) for name, weight in pairs}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected kind=weight,kind=weight ..., got {text!r}") from err


def cmd_data(args: argparse.Namespace) -> None:
    from .data.shapes import ShapesConfig, write_imagefolder

    world = {"kinds": args.kinds} if args.kinds else {}
    world |= {"p_size": args.p_size, "p_position": args.p_position, "p_paraphrase": args.p_paraphrase}
    world |= {"texture": args.texture, "max_count": args.max_count}
    config = ShapesConfig(size=args.size, holdout=tuple(args.holdout), **world)
    path = write_imagefolder(args.out, args.n, config, seed=args.seed)
    print(f"wrote {args.n} images and metadata.jsonl to {path}")


def cmd_caption(args: argparse.Namespace) -> None:
    from .images import open_image
    from .pipelines.caption import CaptionPipeline

    pipe = CaptionPipeline.from_pretrained(args.model, device=pick_device(args.device))
    images = [open_image(path) for path in args.image]
    captions = pipe(images, num_beams=args.beams, max_length=args.max_length).captions
    for path, caption in zip(args.image, captions):
        print(caption if len(captions) == 1 else f"{path}: {caption}")


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from .images import save_images
    from .pipelines import Text2ImagePipeline

    pipe = cast_pipeline(Text2ImagePipeline.from_pretrained(args.model, device=pick_device(args.device)), args.dtype)
    check_scheduler(pipe, args.scheduler, args.model)
    n = args.num_images
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(args.prompt) * n)]
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=n,
        generator=generators,
        sampler=args.sampler,
        eta=args.eta,
        output_type="pt",
        **guide_options(args, pipe),
    ).images
    save_images(images, Path(args.out), nrow=n if len(args.prompt) > 1 else min(8, n), scale=args.scale)


def guide_options(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """``guide`` and ``guide_scale`` of the text-to-image pipeline from ``--guide-model`` and ``--guide-scale`` (none
    given: the model's own guide, if its folder has one, at its own scale)."""
    scale = {} if args.guide_scale is None else {"guide_scale": args.guide_scale}
    if args.guide_model is None:
        return scale
    from .pipelines import Text2ImagePipeline
    from .pipelines.storage import resolve_model_dir

    guide = Text2ImagePipeline.from_pretrained(resolve_model_dir(args.guide_model), device=pipe.device)
    dtype = next(pipe.denoiser.parameters()).dtype
    return {"guide": guide.to(dtype=dtype), **scale}


def add_guide_flags(p: argparse.ArgumentParser) -> None:
    """``--guide-model`` and ``--guide-scale``."""
    flag(p, "--guide-model", default=None, help="autoguidance: a weaker model of the same kind (a run's OUT/guide "
         "from train --export-guide), guided away from; best with a lower --guidance (2). Default: the model's "
         "own guide, if its folder has one (runs trained with --export-guide)")  # fmt: skip
    flag(p, "--guide-scale", type=float, default=None,
         help=f"autoguidance weight (default: the model's own, else {GUIDE_SCALE:g}; 0: no autoguidance)")  # fmt: skip


def check_scheduler(pipe: Any, scheduler: str | None, model: str) -> None:
    """``--scheduler`` of ``sample`` names the noise process the model must have (the seeds' sample.py flag)."""
    from .diffusion import FlowMatching, GaussianDiffusion

    families = {"ddpm": GaussianDiffusion, "flow": FlowMatching}
    if scheduler is not None and not isinstance(pipe.noise_process, families[scheduler]):
        other = next(k for k, v in families.items() if isinstance(pipe.noise_process, v))
        raise UsageError(f"the model in {model} was trained with --scheduler {other}, not {scheduler}")


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
        mask_image=open_mask(mask) if (mask := getattr(args, "mask", None)) not in (None, "auto") else mask,
        coupling=coupling_of(args),
        resample=getattr(args, "resample", 0),
        mask_threshold=args.mask_threshold,
    )


def coupling_of(args: argparse.Namespace):
    """The attention coupling the flags ask for (None without --couple-cross / --couple-self)."""
    from .pipelines.coupling import AttentionCoupling

    cross, self_ = getattr(args, "couple_cross", None), getattr(args, "couple_self", None)
    if cross is None and self_ is None:
        return None
    default = AttentionCoupling()
    return AttentionCoupling(
        default.cross_steps if cross is None else cross, default.self_steps if self_ is None else self_
    )


def open_mask(path: str):
    """The mask image as stored (its mode is checked by the pipeline: one channel, binary)."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"--mask {path} does not exist")
    with Image.open(path) as image:
        return image.copy()


def cmd_edit(args: argparse.Namespace) -> None:
    from .images import open_image, save_images
    from .pipelines import CycleDiffusionPipeline

    image = open_image(args.image)
    pipe = CycleDiffusionPipeline.from_pretrained(args.model, device=pick_device(args.device))
    pipe = cast_pipeline(pipe, args.dtype)
    images = pipe(args.prompt, args.source_prompt, image, **edit_options(args)).images
    save_images(images, Path(args.out), nrow=args.num_images, scale=args.scale)


def cmd_translate(args: argparse.Namespace) -> None:
    from .images import open_image, save_images
    from .pipelines import CycleDiffusionPipeline, translate

    image = open_image(args.image)
    device = pick_device(args.device)
    source = cast_pipeline(CycleDiffusionPipeline.from_pretrained(args.source_model, device=device), args.dtype)
    target = cast_pipeline(CycleDiffusionPipeline.from_pretrained(args.target_model, device=device), args.dtype)
    prompt = args.prompt or [args.source_prompt]
    options = edit_options(args)
    if args.guidance is None:
        options.pop("guidance_scale")  # translate's own default
    images = translate(image, source, target, args.source_prompt, prompt, **options).images
    save_images(images, Path(args.out), nrow=args.num_images, scale=args.scale)


def cmd_serve(args: argparse.Namespace) -> None:
    from .options import from_mapping

    try:
        from .ui import Limits, exit_soon, serve
        from .ui.app import build_app  # noqa: F401  (gradio present?)
    except ImportError as err:
        raise UsageError(f"the web UI needs gradio: pip install 'cyclediffusion[ui]' ({err})") from None
    limits = from_mapping(Limits, {k: v for k, v in given_flags(args).items() if k in Limits.__dataclass_fields__})
    serve(args.model, args.target_model, args.host, args.port, limits, device=args.device, dtype=args.dtype)
    exit_soon()  # stopped: the process ends even if a worker thread would hold it


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .eval import build_suite, evaluate_pipeline, training_holdout
    from .pipelines import Text2ImagePipeline
    from .pipelines.storage import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    pipe = Text2ImagePipeline.from_pretrained(model_dir, device=pick_device(args.device))
    held_out = tuple(h for h in args.held_out if h) if args.held_out else training_holdout(model_dir)
    if held_out and not args.held_out:
        print(f"held out of the training data (its world.json): {', '.join(held_out)}")
    suite = build_suite(per_kind=args.per_kind, held_out=held_out)
    steps = args.steps or pipe.num_inference_steps or EVAL_STEPS
    report = evaluate_pipeline(
        pipe,
        suite,
        samples_per_prompt=args.samples_per_prompt,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        sampler=args.sampler,
        eta=args.eta,
        **guide_options(args, pipe),
    )
    out = Path(args.out) if args.out else model_dir.parent / "eval"
    report.save(out)
    print(report.table())
    print(f"wrote {out / 'shapes_eval.json'} and {out / 'failures.png'}")
    if args.captioner:
        from .eval.caption_eval import evaluate_captioner_on_samples
        from .pipelines.caption import CaptionPipeline

        reader = CaptionPipeline.from_pretrained(resolve_model_dir(args.captioner)).to(pipe.device)
        texts = list(dict.fromkeys(e.text for e in suite))
        scores = evaluate_captioner_on_samples(reader, pipe, texts, steps, args.guidance, args.seed)
        (out / "captioner_on_samples.json").write_text(json.dumps(scores.to_json(), indent=2) + "\n")
        drawn, prompt = scores.shapes_correct, scores.exact_match
        print(f"captioner on {scores.count} samples: true of the drawing {drawn:.3f}, word for word {prompt:.3f}")


def cmd_eval_vae(args: argparse.Namespace) -> None:
    from .eval import evaluate_vae_folder

    data = resolve({"data": DataOptions}, {}, given_flags(args))["data"]
    report, ceiling, out = evaluate_vae_folder(
        args.model, data, args.holdout, args.batch_size, args.seed, args.out, args.device, args.shapes_eval
    )
    print(report.table())
    if ceiling is not None:
        print("\nShapesEval of ground-truth renders through the VAE (what a perfect denoiser on it would score):")
        print(ceiling.table())
    print(f"wrote {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    names = ("out", "minutes", "backbone", "model_size", "lr", "seed", "n")
    print(f"report: {run_demo(**{name: getattr(args, name) for name in names})}")


# --------------------------------------------------------------------------- parser
def build_parser() -> Parser:
    from .data.shapes import NUMBERS, ShapesConfig, write_imagefolder
    from .demo import LR as DEMO_LR
    from .demo import run_demo
    from .eval import evaluate_pipeline
    from .pipelines import Text2ImagePipeline

    parser = Parser(prog="cyclediffusion", description="Train text-to-image diffusion models and edit images.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("demo", help="shapes data -> VAE -> text-to-image model -> samples and report")
    for name, kind in (("out", str), ("minutes", float), ("seed", int)):
        default = api_default(run_demo, name)
        flag(p, f"--{name}", type=kind, default=default, help=f"(default {default})")
    flag(p, "--lr", type=positive_float, default=None, help=f"the text-to-image model's learning rate (default: "
         f"{DEMO_LR['cpu-fp32']:g} on a CPU without native bf16, where the minutes buy fewer steps, else "
         f"{DEMO_LR['fast']:g})")  # fmt: skip
    flag(p, "--model-size", default=None, help="size of the backbone (default: DiT tiny, U-Net small)")
    flag(p, "--backbone", choices=["unet", "dit"], default=api_default(run_demo, "backbone"))
    flag(p, "--n", type=positive_int, default=api_default(run_demo, "n"), help="number of training images")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="write a built-in dataset as an imagefolder")
    p.add_argument("kind", choices=["shapes"])
    flag(p, "--out", required=True)
    flag(p, "--n", type=positive_int, default=20000)
    flag(p, "--size", type=positive_int, default=32)
    flag(p, "--seed", type=int, default=api_default(write_imagefolder, "seed"))
    flag(p, "--holdout", action="append", default=[], help="colour-shape pair never drawn, e.g. 'purple triangle'")
    world = ShapesConfig()
    kinds = ",".join(f"{k}={v:g}" for k, v in world.kinds.items())
    flag(p, "--kinds", type=kind_weights, default=None, help=f"scene kinds and their weights (default {kinds})")
    flag(p, "--p-size", type=float, default=world.p_size, help="chance a single object's caption names its size")
    flag(p, "--p-position", type=float, default=world.p_position, help="... and its position")
    flag(p, "--p-paraphrase", type=float, default=world.p_paraphrase, help="chance a pair or relation is said "
         "the other way round ('B to the right of A')")  # fmt: skip
    flag(p, "--texture", type=float, default=world.texture, help="background noise std in 0-255 units (0: plain)")
    flag(p, "--max-count", type=positive_int, default=world.max_count, help="most objects a count caption names "
         f"(up to {len(NUMBERS)}, '{NUMBERS[-1]}')")  # fmt: skip
    p.set_defaults(func=cmd_data)

    add_training_command(sub, "train-vae", "train the KL autoencoder and measure its latent scaling")
    add_training_command(sub, "train", "train a text-to-image model (text encoder + denoiser)")
    add_training_command(sub, "train-captioner", "train an image captioner (for the cycle loss, or on its own)")
    add_training_command(sub, "distill", "distill a text-to-image model into a few-step student (guidance baked in)")

    p = sub.add_parser("caption", help="caption images with a trained captioner")
    flag(p, "--model", required=True, help="train-captioner run folder or model folder")
    flag(p, "--image", action="append", required=True, help="image file (repeatable)")
    flag(p, "--beams", type=positive_int, default=1, help="beam search width (1: greedy)")
    flag(p, "--max-length", type=positive_int, default=None, help="longest caption in tokens")
    flag(p, "--device", default="auto")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("eval", help="ShapesEval: does the model draw what the caption says? (offline, exact)")
    flag(p, "--model", required=True, help="run folder or model folder trained on the shapes world")
    flag(p, "--samples-per-prompt", type=positive_int, default=api_default(evaluate_pipeline, "samples_per_prompt"))
    flag(p, "--per-kind", type=positive_int, default=20, help="prompts per category of the suite")
    flag(p, "--held-out", action="append", default=[], help="colour-shape pair held out of training (default: those "
         "of the shapes folder the run trained on, from its world.json; --held-out '' for none)")  # fmt: skip
    flag(p, "--steps", type=positive_int, default=None, help=f"sampler steps (default: the model's own, else "
         f"{EVAL_STEPS})")  # fmt: skip
    flag(p, "--sampler", choices=SAMPLER_CHOICES, default=None, help="sampler (default: the model's own)")
    flag(p, "--eta", type=float, default=api_default(evaluate_pipeline, "eta"), help="DDIM stochasticity in [0, 1]")
    flag(p, "--guidance", type=float, default=None, help="guidance (default: the model's own)")
    flag(p, "--seed", type=int, default=0)
    flag(p, "--device", default="auto")
    flag(p, "--out", default=None, help="folder for shapes_eval.json and failures.png (default: RUN/eval)")
    flag(p, "--captioner", default=None, help="also score this captioner on the model's samples (true of the drawing)")
    add_guide_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-vae", help="VAE reconstruction (PSNR, SSIM) and latent statistics on images")
    flag(p, "--model", required=True, help="VAE folder, train-vae run folder, or a pipeline / run with a vae/")
    add_flags(p, DataOptions, "data")
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
    flag(
        p,
        "--shapes-eval",
        type=int,
        default=0,
        metavar="N",
        help="also score N renders per ShapesEval prompt after the VAE's reconstruction: the ceiling it sets on a "
        "text-to-image model (default 0: off)",
    )
    flag(p, "--device", default="auto")
    flag(p, "--out", default=None, help="JSON file or folder (default: RUN/eval/vae_eval.json)")
    p.set_defaults(func=cmd_eval_vae)

    call = Text2ImagePipeline.__call__
    p = sub.add_parser("sample", help="generate images from a trained model")
    flag(p, "--model", required=True, help="run folder or model folder")
    flag(p, "--prompt", action="append", required=True, help="prompt (repeatable)")
    flag(p, "--negative-prompt", default=None)
    flag(p, "--steps", type=positive_int, default=None, help="sampler steps (default: the model's own, else "
         f"{DEFAULT_STEPS})")  # fmt: skip
    flag(p, "--guidance", type=float, default=None, help="guidance (default: the model's own)")
    flag(p, "--sampler", choices=SAMPLER_CHOICES, default=None)
    flag(p, "--scheduler", choices=["ddpm", "flow"], default=None, help="check the model's noise process")
    flag(p, "--eta", type=float, default=api_default(call, "eta"))
    flag(p, "--seed", type=int, default=0)
    flag(p, "--num-images", type=positive_int, default=1)
    flag(p, "--scale", type=positive_int, default=1, help="enlarge the PNG (nearest neighbour)")
    flag(p, "--device", default="auto")
    add_dtype_flag(p)
    add_guide_flags(p)
    flag(p, "--out", default="sample.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", help="CycleDiffusion: edit an image by changing its caption")
    flag(p, "--model", required=True, help="run folder, model folder, or a diffusers Stable Diffusion folder")
    flag(p, "--source-prompt", required=True, help="what the image shows")
    flag(p, "--prompt", action="append", required=True, help="what it should show (repeatable)")
    add_edit_flags(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("translate", help="unpaired translation between two models sharing a VAE (CycleDiffusion)")
    flag(p, "--source-model", required=True, help="model of the image's domain")
    flag(p, "--target-model", required=True, help="model of the domain to translate to")
    flag(p, "--source-prompt", default="", help="caption under the source model (default: empty)")
    flag(p, "--prompt", action="append", default=None, help="caption under the target model (default: the source's)")
    add_edit_flags(p)
    p.set_defaults(func=cmd_translate)

    from .ui.limits import Limits

    p = sub.add_parser("serve", help="web UI: generate, edit and translate in a browser (needs the ui extra)")
    flag(p, "--model", required=True, help="run folder or model folder")
    flag(p, "--target-model", default=None, help="a second model, for the Translate tab")
    flag(p, "--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    flag(p, "--port", type=int, default=7860)
    flag(p, "--device", default="auto")
    add_dtype_flag(p)
    add_flags(p, Limits, "limits of one request")
    p.set_defaults(func=cmd_serve)
    return parser


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    from .precision import DTYPES

    choices = ["auto", *DTYPES]
    flag(p, "--dtype", choices=choices, default="auto", help="auto: bfloat16 where the device computes it natively")


def add_edit_flags(p: argparse.ArgumentParser) -> None:
    from .pipelines import METHODS, CycleDiffusionPipeline

    call = CycleDiffusionPipeline.__call__
    flag(p, "--image", required=True, help="input image")
    flag(p, "--method", choices=list(METHODS), default=api_default(call, "method"), help=", ".join(METHODS))
    flag(p, "--mask", default=None, help="where to edit: a one-channel black/white image of the input's size, "
         "or auto (where the two prompts' estimates differ)")  # fmt: skip
    flag(p, "--couple-cross", type=float, default=None, help="share of the steps the target reuses the source's "
         "cross-attention for shared words (prompt-to-prompt; default with --couple-self: 0.8)")  # fmt: skip
    flag(p, "--couple-self", type=float, default=None, help="share of the steps it reuses the source's self-attention")
    flag(p, "--mask-threshold", type=float, default=api_default(call, "mask_threshold"), help="with --mask auto: "
         "where the mask is cut, as a share of the largest difference of the two prompts' estimates, in (0, 1); "
         "lower edits more of the image")  # fmt: skip
    flag(p, "--resample", type=int, default=api_default(call, "resample"), help="with --mask: take each step "
         "1 + N times, noising back up in between (RePaint), so the change is drawn inside the mask")  # fmt: skip
    flag(p, "--strength", type=float, default=api_default(call, "strength"), help="how far into the chain, in [0, 1]")
    flag(p, "--eta", type=float, default=api_default(call, "eta"), help="DDIM stochasticity, > 0 for cycle")
    flag(p, "--guidance", type=float, default=None, help="guidance of the target chain (default: the model's own)")
    flag(p, "--source-guidance", type=float, default=api_default(call, "source_guidance_scale"))
    flag(p, "--steps", type=positive_int, default=api_default(call, "num_inference_steps"), help="steps of the chain")
    flag(p, "--seed", type=int, default=0)
    flag(p, "--num-images", type=positive_int, default=1, help="edits per prompt")
    flag(p, "--scale", type=positive_int, default=1, help="enlarge the PNG (nearest neighbour)")
    flag(p, "--device", default="auto")
    add_dtype_flag(p)
    flag(p, "--out", default="edited.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cyclediffusion`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ArithmeticError as err:  # training stopped at a non-finite loss
        if args.debug:
            raise
        print(f"cyclediffusion: error: {err}", file=sys.stderr)
        return 1
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
