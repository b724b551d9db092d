"""The options of a training run, each declared once: its field here is its default, its help, its ``--flag`` (both
spellings and the seeds' names) and its key in ``OUT/options.yaml``.

A run reads them from the command line, from a config file (``--config run.yaml``, sections ``data``, ``run`` and
``model`` / ``vae`` / ``captioner``) or from Python, and writes what it resolved to ``OUT/options.yaml``, which
``--config`` takes back to reproduce the run. This module imports no Lightning.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..models import AutoencoderKL
from ..options import option
from ..precision import PRECISIONS
from ..recipes import DEFAULT_GUIDANCE, DEFAULT_PROMPTS, build_denoiser, build_noise_process, build_text_encoder
from ..text import Tokenizer
from .optimizers import OPTIMIZERS
from .repa import REPA_ENCODERS

LR_SCHEDULES = ("constant", "cosine", "wsd")  # OptimConfig's

CYCLE_MODES = ("x0", "last-k", "grpo")
CYCLE_OBJECTIVES = ("ce", "weighted", "contrastive")
CYCLE_NEGATIVES = ("colours", "colours+relation")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return value


def devices_arg(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


@dataclass
class DataOptions:
    """Where the captioned images come from and how they are prepared."""

    data: str = option(help="imagefolder (images + metadata.jsonl/csv) or a hub dataset name", aliases=("dataset",))
    image_size: int = option(32, "centre-crop size in pixels", parse=positive_int)
    split: str = option("train", "dataset split (hub datasets)")
    cache_dir: str | None = option(None, "datasets cache folder (hub datasets)")
    subset_size: int | None = option(None, "use only the first N examples (0 or none: all)")
    caption_column: str = option("text", "caption column")
    image_column: str = option("image", "image column of hub datasets")
    num_workers: int = option(0, "data loader worker processes")
    cache_latents: bool = option(False, "encode the dataset once with the VAE (text-to-image)")
    streaming: bool = option(
        False, "read --data as a stream (datasets' streaming=True; a folder of .tar shards is always streamed): "
        "nothing is scanned before the first step, rows are decoded and checked in the loader's workers"
    )  # fmt: skip
    check_images: bool = option(
        True, "decode every image once before training and drop the bad ones (--no-check-images: each is checked "
        "as it is read, a bad one replaced by the next good one, so the first step does not wait for the data)"
    )  # fmt: skip


@dataclass
class RunOptions:
    """Length, optimisation, precision, devices and bookkeeping of a training run."""

    out: str = option(help="run folder: model/, checkpoints/, logs/, samples/, options.yaml")
    steps: int | None = option(None, "optimiser steps", parse=positive_int)
    epochs: float | None = option(None, "epochs (instead of --steps)")
    minutes: float | None = option(None, "wall-time budget (alone or as a cap)")
    batch_size: int = option(64, "batch size per device", parse=positive_int)
    lr: float = option(1e-3, "peak learning rate", aliases=("learning_rate",), parse=positive_float)
    wd: float = option(0.0, "weight decay of the weight matrices", aliases=("weight_decay",))
    optimizer: str = option(
        "adamw", "adamw, or muon: Muon (orthogonalised momentum) for the hidden layers' weight matrices at the same "
        "--lr, AdamW for embeddings, convolutions, norms, biases and output layers", choices=OPTIMIZERS,
    )  # fmt: skip
    warmup: int = option(100, "linear LR warmup steps")
    lr_schedule: str = option(
        "constant",
        "LR after warmup (cosine: to zero at the end of the steps or minutes; wsd: constant, then linear to zero "
        "over the last 20%)",
        choices=LR_SCHEDULES,
    )
    precision: str = option(
        "auto", "Lightning precision (auto: bf16-mixed on CUDA or a CPU with native bf16, else 32)", choices=PRECISIONS
    )
    accumulate: int = option(1, "gradient accumulation steps", parse=positive_int)
    gradient_checkpointing: bool = option(
        False, "recompute each denoiser block in the backward pass (less activation memory, about a third more time)"
    )
    grad_clip: float | None = option(1.0, "gradient norm clip (0: off)")
    devices: int | str = option(1, "number of devices (or 'auto')", parse=devices_arg)
    num_nodes: int = option(
        1, "machines of the run (each runs the same command; rank and address from torchrun, SLURM or "
        "MASTER_ADDR / MASTER_PORT / NODE_RANK)", parse=positive_int,
    )  # fmt: skip
    accelerator: str = option("auto", "auto, cpu, gpu ...")
    strategy: str = option("auto", "auto, ddp, ddp_spawn ...")
    seed: int = option(0, "seed of data order, noise and initialisation")
    ema_decay: float | None = option(0.999, "EMA decay (0: no EMA)")
    log_every: int = option(25, "log metrics every N steps", parse=positive_int)
    checkpoint_every: int = option(500, "resume checkpoint every N steps")
    export_every: int = option(0, "export the model every N steps (always at the end)")
    export_guide: float | None = option(
        None, "also export the model once this share of the run is done, to OUT/guide: a weaker copy of the final "
        "model for autoguidance, which the exported model then carries (sample/eval use it; 0.5 is usual)",
    )  # fmt: skip
    sample_every: int = option(0, "sample grid of fixed prompts every N steps")
    resume: bool = option(True, "continue from OUT/checkpoints/last.ckpt when it exists (--no-resume: start afresh)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if not (self.steps or self.epochs or self.minutes):
            raise ValueError("give the length of the run: --steps, --epochs or --minutes")
        if self.batch_size < 1 or self.accumulate < 1:
            raise ValueError(f"batch size and accumulation must be >= 1, got {self.batch_size}, {self.accumulate}")
        if self.export_guide is not None and not 0 < self.export_guide < 1:
            raise ValueError(f"--export-guide is a share of the run in (0, 1), got {self.export_guide}")


@dataclass
class CycleConfig:
    """The cycle-consistency term of the text-to-image step: ``weight`` x the frozen captioner's loss.

    Mode ``x0``: on every ``every``-th optimiser step, a ``fraction`` of the global batch (at least one
    row) is noised again at a time below ``t_max`` (in the noise process's own units: integer timesteps
    for Gaussian diffusion, default ``T // 5``; path time in (0, 1] for flow matching, default 0.2), the
    denoiser predicts it under the true caption (never dropped), the prediction becomes the one-step
    estimate ``x0_hat``, the frozen VAE decodes it (pixel-space models use it as it is) and the frozen
    captioner scores the caption. Gradients reach the denoiser and the text encoder only.

    Mode ``last-k``: the chosen rows are drawn from pure noise under their captions by a deterministic
    DDIM sampler of ``sample_steps`` steps (flow matching: Euler), the first ``sample_steps - k`` without
    gradient and the last ``k`` with it, so the captioner reads what the model draws from the caption
    alone and the gradient runs back through ``k`` denoiser calls (``t_max`` is not used), guided by ``guidance``.

    Mode ``grpo``: a policy gradient, as in Flow-GRPO. Each chosen row's caption is drawn ``group`` times from
    pure noise by the stochastic DDIM sampler (``eta`` > 0: each step is a Gaussian policy) of ``sample_steps``
    steps without gradient, guided by ``guidance``; the reward of a drawing is minus the frozen captioner's
    ``objective`` on it, normalised within its group into an advantage, and the gradient is that of
    ``-advantage x sigma log p(step)`` on ``k`` steps of the chain chosen at random (the policy's mean is
    recomputed with gradient; each step's log-density is taken times its noise scale ``sigma``, so its gradient
    is the drawn noise times the mean's gradient and the nearly deterministic last steps add no runaway
    variance). One update per draw, so the importance ratio is 1 and PPO's clip never acts; the denoising loss
    beside it keeps the model near its data. ``fraction`` is the share of the batch whose rows are drawn
    (``fraction x batch / group`` captions, at least one). The logged term is the captioner's loss on the draws.

    ``t_max`` up to the whole scale (flow 1.0, ddpm T) reads the estimate where the layout is still decided.
    ``objective`` weights what matters (see :meth:`~.caption_loss.CycleLoss.objective`); ``start`` lets the term
    act only in the last part of a run (or fine-tune an exported model with ``--init-from``).
    """

    weight: float = option(0.1, "weight of the captioner's loss")
    t_max: float | None = option(None, "x0: noise below this time (none: ddpm T/5 steps, flow 0.2)")
    every: int = option(1, "add the term every K optimiser steps", parse=positive_int)
    fraction: float = option(0.25, "share of the batch given the term")
    mode: str = option(
        "x0", "x0: one-step estimate at low noise; last-k: draw from noise, gradient through the last k steps; "
        "grpo: policy gradient over groups of stochastic draws, the captioner's score as reward",
        choices=CYCLE_MODES,
    )  # fmt: skip
    k: int = option(2, "last-k: sampler steps with gradient; grpo: steps of each chain trained", parse=positive_int)
    sample_steps: int = option(10, "last-k, grpo: sampler steps in all", parse=positive_int)
    guidance: float = option(1.0, "last-k, grpo: classifier-free guidance of the sampling chain (1: none)")
    group: int = option(8, "grpo: drawings per caption, compared with each other", parse=positive_int)
    eta: float = option(1.0, "grpo: DDIM eta of the chain (its randomness is the policy's)")
    objective: str = option(
        "ce", "ce: caption cross-entropy; weighted: colour, shape, number and relation words weigh word_weight; "
        "contrastive: cross-entropy plus a margin over the caption with its colours swapped", choices=CYCLE_OBJECTIVES,
    )  # fmt: skip
    word_weight: float = option(3.0, "weighted: weight of the colour, shape, number and relation words")
    negatives: str = option(
        "colours", "contrastive: the negative captions: the colours swapped, or for relation captions also the "
        "opposite relation (one margin each)", choices=CYCLE_NEGATIVES,
    )  # fmt: skip
    start: float = option(0.0, "share of the run (steps or minutes) before the term starts")

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"the cycle weight must be non-negative, got {self.weight}")
        if self.every < 1:
            raise ValueError(f"cycle every must be at least 1, got {self.every}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"the cycle fraction must be in (0, 1], got {self.fraction}")
        if self.mode not in CYCLE_MODES:
            raise ValueError(f"unknown cycle mode {self.mode!r}; choose from {', '.join(CYCLE_MODES)}")
        if self.t_max is not None and self.t_max <= 0:
            raise ValueError(f"the cycle t_max must be positive, got {self.t_max}")
        if self.objective not in CYCLE_OBJECTIVES:
            raise ValueError(f"unknown cycle objective {self.objective!r}; choose from {', '.join(CYCLE_OBJECTIVES)}")
        if self.negatives not in CYCLE_NEGATIVES:
            raise ValueError(f"unknown cycle negatives {self.negatives!r}; choose from {', '.join(CYCLE_NEGATIVES)}")
        if not 0 <= self.start < 1:
            raise ValueError(f"the cycle start is a share of the run in [0, 1), got {self.start}")
        if self.word_weight <= 0:
            raise ValueError(f"the cycle word weight must be positive, got {self.word_weight}")
        if not 1 <= self.k <= self.sample_steps:
            raise ValueError(f"the cycle needs 1 <= k <= sample_steps, got {self.k} and {self.sample_steps}")
        if self.mode == "grpo":
            if self.group < 2:
                raise ValueError(f"grpo compares drawings of one caption: the group needs at least 2, got {self.group}")
            if self.eta <= 0:
                raise ValueError(f"grpo needs a stochastic chain: eta must be positive, got {self.eta}")
            if self.k >= self.sample_steps:
                raise ValueError(
                    f"grpo trains k <= sample_steps - 1 steps (the last is deterministic), got {self.k} and "
                    f"{self.sample_steps}"
                )


@dataclass
class ModelOptions:
    """The text-to-image model: backbone, noise process and text encoder, or a pipeline to start from.

    ``model_size`` names a recipe of :mod:`cyclediffusion.recipes`; the ``unet_*`` and ``dit_*`` fields change
    one architecture field of it at a time. ``init_from`` (an exported pipeline, or a run folder) supplies
    tokenizer, text encoder, denoiser, noise process and VAE, and the options that would build them are ignored.
    ``captioner`` (an exported caption pipeline) adds the cycle-consistency term described by ``cycle``.
    """

    backbone: str = option("unet", "denoiser architecture", choices=("unet", "dit"), aliases=("denoising_type",))
    model_size: str = option("small", "unet: tiny|small|medium|base; dit: tiny|mini/2|small|DiT-S/2|...")
    unet_base_channels: int | None = option(None, "U-Net channels of the first level (later levels keep the ratios)")
    dit_hidden_size: int | None = option(None, "DiT width")
    dit_depth: int | None = option(None, "DiT blocks")
    dit_num_heads: int | None = option(None, "DiT attention heads (alone: the size's head width is kept)")
    dit_patch_size: int | None = option(None, "DiT patch side in latent cells")
    dit_joint_text: bool = option(
        False, "DiT: MM-DiT blocks (text tokens get their own stream; image and text attend jointly) instead of "
        "cross-attention"
    )  # fmt: skip
    scheduler: str = option("ddpm", "noise process", choices=("ddpm", "flow"))
    prediction_type: str = option("v_prediction", "ddpm: network target", choices=("epsilon", "x0", "v_prediction"))
    beta_schedule: str = option("cosine", "ddpm: beta schedule", choices=("linear", "scaled_linear", "cosine"))
    num_train_timesteps: int | None = option(None, "ddpm: diffusion timesteps (none: 1000)", aliases=("num_timesteps",))
    # min-SNR-5 (ddpm): ShapesEval shape 0.89 against 0.55 unweighted after 5 CPU min
    snr_gamma: float | None = option(
        5.0, "ddpm: min-SNR-gamma loss weighting (Hang et al. 2023); 0 turns it off", parse=non_negative_float
    )
    time_sampling: str = option("logit_normal", "flow: training times", choices=("uniform", "logit_normal"))
    logit_mean: float | None = option(
        None, "flow: mean of the logit-normal training times (none: 0; above 0 trains more at the noisy end)"
    )
    vae: str | None = option(None, "trained VAE (run folder or model folder); pixel space without it")
    latent_channels: int | None = option(None, "latent channels the VAE must have (checked)", aliases=("latent_dim",))
    caption_dropout: float = option(0.1, "probability of the empty caption (for guidance)")
    repa_weight: float = option(
        0.0, "weight of representation alignment (REPA) to a frozen encoder's features (0: off)",
        parse=non_negative_float,
    )  # fmt: skip
    repa_encoder: str = option("vae", "REPA target: the VAE encoder, or the --captioner's image encoder",
                               choices=REPA_ENCODERS)  # fmt: skip
    repa_until: float = option(1.0, "share of the run (steps or minutes) after which REPA is off")
    self_condition: float = option(
        0.0, "self-conditioning: share of the steps on which the denoiser also reads its own x0 estimate, as it does "
        "at every sampler step (0: off; 0.5 is usual)",
    )  # fmt: skip
    immiscible_noise: bool = option(False, "pair each image of a batch with a nearby noise draw (immiscible diffusion)")
    text_width: int = option(128, "text encoder width", parse=positive_int, aliases=("text_emb_dim",))
    text_layers: int = option(2, "text encoder layers", parse=positive_int)
    text_heads: int = option(4, "text encoder attention heads", parse=positive_int)
    text_refiner_layers: int = option(0, "bidirectional text blocks on top of the causal ones (each word sees all)")
    text_layer_mix: bool = option(False, "token states mix every text block's output with learned weights")
    mask_padding: bool = option(
        True, "cross-attention ignores the caption's padding tokens (--no-mask-padding: attends to all of them)"
    )
    pooled_text: bool = option(
        True, "the pooled caption state also conditions every position, with the time (--no-pooled-text: the "
        "caption reaches the denoiser through cross-attention only)"
    )  # fmt: skip
    coord_channels: bool = option(False, "U-Net: two input channels with each cell's (y, x), for absolute position")
    attention_positions: bool = option(
        False, "U-Net: each transformer adds a learned map of 2-D sin-cos cell positions to its tokens"
    )
    vocab_size: int = option(1024, "BPE vocabulary trained on the captions", parse=positive_int)
    max_length: int | None = option(None, "token length (none: fit the captions)", parse=positive_int)
    guidance_scale: float = option(DEFAULT_GUIDANCE, "guidance the exported model samples with by default")
    sample_prompts: list[str] = option(
        factory=lambda: list(DEFAULT_PROMPTS), help="prompt of the sample grids (repeatable)", flag="sample_prompt"
    )
    init_from: str | None = option(
        None, "fine-tune an exported pipeline (run or model folder) or a diffusers Stable Diffusion folder"
    )
    train_text_encoder: bool = option(
        True, "train the text encoder with the denoiser (--no-train-text-encoder: frozen)"
    )
    captioner: str | None = option(
        None, "captioner of the cycle loss: a train-captioner run or model folder, or a transformers Pix2Struct folder"
    )
    captioner_device: str | None = option(None, "device of the captioner (e.g. cuda:1; none: the model's)")
    cycle: CycleConfig = option(
        factory=CycleConfig, help="cycle loss (a frozen captioner reads the caption back)", prefix="cycle"
    )

    def __post_init__(self) -> None:
        if self.cycle != CycleConfig() and self.cycle.weight > 0 and not self.captioner:
            raise ValueError("the --cycle-* options need --captioner")
        if self.num_train_timesteps is not None and self.scheduler != "ddpm":
            raise ValueError("--num-train-timesteps is an option of --scheduler ddpm")
        if self.logit_mean is not None and (self.scheduler != "flow" or self.time_sampling != "logit_normal"):
            raise ValueError("--logit-mean is an option of --scheduler flow with --time-sampling logit_normal")
        if not 0 <= self.self_condition <= 1:
            raise ValueError(f"--self-condition is a probability in [0, 1], got {self.self_condition}")
        if not 0 < self.repa_until <= 1:
            raise ValueError(f"--repa-until is a share of the run in (0, 1], got {self.repa_until}")
        if self.repa_weight > 0 and self.repa_encoder == "captioner" and not self.captioner:
            raise ValueError("--repa-encoder captioner needs --captioner")
        given_dit = list(self.dit_fields())
        if self.backbone == "unet" and given_dit:
            raise ValueError(f"--dit-{given_dit[0].replace('_', '-')} is an option of --backbone dit")
        if self.backbone == "dit" and (self.coord_channels or self.attention_positions or self.unet_base_channels):
            raise ValueError("--coord-channels, --attention-positions and --unet-base-channels are U-Net options (the "
                             "DiT's position embeddings are absolute; its width is --dit-hidden-size)")  # fmt: skip

    def build(self, tokenizer: Tokenizer, vae: AutoencoderKL | None, image_size: int) -> dict[str, Any]:
        """A fresh ``text_encoder``, ``denoiser`` and ``noise_process`` of these options for ``tokenizer`` and the
        latents of ``vae`` (pixels without one) at ``image_size``, built by :mod:`cyclediffusion.recipes`."""
        channels, side = self.latent_shape(vae, image_size)
        arch = {"in_channels": channels, "sample_size": side, "context_dim": self.text_width, **self.architecture()}
        arch["pooled"] = self.pooled_text
        return {
            "text_encoder": build_text_encoder(
                tokenizer,
                self.text_width,
                self.text_layers,
                self.text_heads,
                refiner_layers=self.text_refiner_layers,
                layer_mix=self.text_layer_mix,
                mask_padding=self.mask_padding,
            ),
            "denoiser": build_denoiser(self.backbone, self.model_size, **arch),
            "noise_process": build_noise_process(self.scheduler, **self.noise_options()),
        }

    def latent_shape(self, vae: AutoencoderKL | None, image_size: int) -> tuple[int, int]:
        """``(channels, side)`` of the denoiser's inputs: the VAE's latents, or pixels without one."""
        if vae is None:
            channels, side = 3, image_size
        else:
            if image_size % vae.downsample_factor:
                raise ValueError(f"--image-size {image_size} is not a multiple of the VAE's {vae.downsample_factor}")
            channels, side = vae.latent_channels, image_size // vae.downsample_factor
        if self.latent_channels is not None and self.latent_channels != channels:
            where = "the VAE's latents have" if vae is not None else "pixel space (no --vae) has"
            raise ValueError(f"--latent-channels {self.latent_channels}, but {where} {channels} channels")
        return channels, side

    def noise_options(self) -> dict[str, object]:
        """The config fields of the chosen noise process (see :func:`~cyclediffusion.recipes.build_noise_process`)."""
        if self.scheduler == "flow":
            return {"time_sampling": self.time_sampling, "logit_mean": self.logit_mean}
        return {
            "prediction_type": self.prediction_type,
            "beta_schedule": self.beta_schedule,
            "snr_gamma": self.snr_gamma,
            "num_train_timesteps": self.num_train_timesteps,
        }

    def dit_fields(self) -> dict[str, int | bool]:
        """The DiT config fields given one by one (``dit_depth`` -> ``depth``)."""
        dit = {"hidden_size": self.dit_hidden_size, "depth": self.dit_depth, "num_heads": self.dit_num_heads}
        dit |= {"patch_size": self.dit_patch_size, "joint_text": self.dit_joint_text or None}
        return {k: v for k, v in dit.items() if v is not None}

    def architecture(self) -> dict[str, object]:
        """The fields set on top of ``model_size`` (see :func:`~cyclediffusion.recipes.build_denoiser`)."""
        sc = {"self_condition": True} if self.self_condition > 0 else {}
        if self.backbone == "dit":
            return self.dit_fields() | sc
        flags = {"coord_channels": self.coord_channels, "attention_positions": self.attention_positions}
        return {"base_channels": self.unet_base_channels, **{k: True for k, on in flags.items() if on}} | sc


@dataclass
class VAEOptions:
    """The KL autoencoder: a named size, its spatial downsampling and the KL weight."""

    size: str = option("tiny", "VAE size", choices=("tiny", "small", "base"), flag="vae_size")
    downsample: int = option(4, "spatial downsampling", choices=(2, 4, 8))
    latent_channels: int = option(4, "latent channels", aliases=("latent_dim",), parse=positive_int)
    kl_weight: float = option(1e-4, "weight of the KL term per latent element")


@dataclass
class CaptionerOptions:
    """The captioner: a named size, its patch size, and its tokenizer (trained here, or ``tokenizer``'s).

    ``tokenizer`` is a tokenizer folder, or a model or run folder holding one (a text-to-image run's,
    so that both models share it). ``read_estimates_of`` names a text-to-image model whose one-step estimates of
    the training images (at noise levels drawn as in its training) replace ``estimate_fraction`` of every batch,
    always with the image's true caption: a captioner for the cycle loss that reads what that model draws.
    ``holdout`` keeps the last N images out of training to score the captioner on at the end (generated with
    ``num_beams``).
    """

    size: str = option("small", "captioner size", choices=("tiny", "small", "base"), flag="captioner_size")
    patch_size: int | None = option(None, "pixels per patch side (none: image size / 8)", parse=positive_int)
    tokenizer: str | None = option(None, "reuse a tokenizer: its folder, or a text-to-image run or model folder")
    vocab_size: int = option(1024, "vocabulary of a tokenizer trained here", parse=positive_int)
    max_length: int | None = option(None, "token length (none: fit the captions)", parse=positive_int)
    holdout: int = option(0, "keep the last N images out of training; score captions on them")
    read_estimates_of: str | None = option(
        None, "a text-to-image model: train also on its one-step estimates of the images (true captions)"
    )
    estimate_fraction: float = option(0.5, "share of each batch replaced by those estimates")

    def __post_init__(self) -> None:
        if not 0 < self.estimate_fraction <= 1:
            raise ValueError(f"--estimate-fraction must be in (0, 1], got {self.estimate_fraction}")

    num_beams: int = option(1, "beam width of the held-out captions", parse=positive_int, flag="beams")


START_FROM = ("data", "noise", "student")
"""Where a distilled student's training steps start (:class:`~.distill.DistillModule`)."""


@dataclass
class DistillOptions:
    """A few-step student of a trained text-to-image model (``teacher``): the student starts as the teacher's
    denoiser and learns to take each of its ``student_steps`` sampler steps where ``teacher_substeps`` guided
    steps of the teacher go (the DDIM / Euler step of the teacher's noise process; text encoder, VAE and
    tokenizer are the teacher's, frozen). The guidance is baked in: the student samples with one network call per
    step and exports with guidance 1 and ``student_steps`` as its default steps."""

    teacher: str = option(help="the model to distill: an exported pipeline or a text-to-image run folder")
    student_steps: int = option(4, "sampler steps of the student", parse=positive_int)
    teacher_substeps: int = option(4, "teacher steps per student step", parse=positive_int)
    guidance: float | None = option(None, "the teacher's classifier-free guidance (none: what it samples with)")
    guide_scale: float = option(
        0.0, "the weight of the teacher's autoguidance model (its folder's guide/) in the steps the student learns "
        "(0: classifier-free guidance alone, which measured better at equal time; the demo samples with 3)",
    )  # fmt: skip
    start_from: str = option(
        "data", "where each student step starts: the data noised to its time, the teacher's own sampling path "
        "from pure noise (every step of it trained; the data gives only captions), or the student's own earlier "
        "steps from the noised data", choices=START_FROM,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.guidance is not None and self.guidance < 0:
            raise ValueError(f"--guidance must be non-negative, got {self.guidance}")
        if self.guide_scale < 0:
            raise ValueError(f"--guide-scale must be non-negative, got {self.guide_scale}")


# The sections of each training command, in the order of options.yaml, and the defaults its recipe changes.
COMMANDS: dict[str, dict[str, type]] = {
    "train": {"data": DataOptions, "run": RunOptions, "model": ModelOptions},
    "train-vae": {"data": DataOptions, "run": RunOptions, "vae": VAEOptions},
    "train-captioner": {"data": DataOptions, "run": RunOptions, "captioner": CaptionerOptions},
    "distill": {"data": DataOptions, "run": RunOptions, "distill": DistillOptions},
}
RECIPE_DEFAULTS: dict[str, dict[str, dict[str, object]]] = {
    "train-captioner": {"run": {"lr": 5e-4}},
    "distill": {"run": {"lr": 2e-4, "warmup": 20}},
}
