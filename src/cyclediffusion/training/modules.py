"""LightningModules: what one training step of the VAE, the text-to-image model or the captioner computes.

Randomness is keyed to the step, not to a global RNG: each micro-batch carries its step index, and
the noise, timesteps, caption dropout and VAE posterior samples are drawn for the whole global batch
from a generator seeded with ``(seed, step)`` and then sliced to this rank's rows. A run resumed from
a checkpoint, or split over several processes, therefore sees exactly the numbers of one
uninterrupted single-process run.

The text-to-image step may add a cycle-consistency term: a frozen captioner reads the caption back from
the denoiser's one-step estimate of the clean image (see :class:`CycleConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from ..diffusion import NoiseProcess
from ..diffusion.base import TrainingLoss, randn
from ..models import AutoencoderKL, Captioner, DiagonalGaussian, TextEncoder, TextEncoderOutput
from ..pipelines import Text2ImagePipeline
from ..pipelines.caption import CaptionPipeline, check_compatible
from ..text import Tokenizer

LOSS_BINS = 4
CYCLE_MODES = ("x0", "last-k")
CYCLE_STREAM = 1  # the cycle term draws from its own step-keyed stream: the plain step's numbers never move


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule: AdamW, linear warmup, then constant or cosine decay."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "constant"
    total_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown LR schedule {self.schedule!r}; choose 'constant' or 'cosine'")
        if self.schedule == "cosine" and not self.total_steps:
            raise ValueError("the cosine LR schedule needs a known number of steps (--steps or --epochs)")

    def factor(self, step: int) -> float:
        """LR multiplier at optimiser step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))


class Shared:
    """Holds an object outside the module tree: not trained, not checkpointed, not copied by EMA."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> Shared:
        return self


class StepModule(L.LightningModule):
    """Shared plumbing: optimiser, step-keyed generators and global-batch slicing."""

    def __init__(self, optim: OptimConfig, seed: int = 0) -> None:
        super().__init__()
        self.optim = optim
        self.seed = seed

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        params = self.trainable_parameters()
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": self.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.optim.factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------- step-keyed randomness
    def step_generator(self, step: int, stream: int = 0) -> torch.Generator:
        """The generator of ``step``; other ``stream`` numbers give independent generators of the same step."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + int(step) + stream * 0x9E3779B97F4A7C15) % 2**64)
        return g

    def rank_rows(self, local_batch: int) -> slice:
        """This rank's rows of the global batch."""
        rank = self.global_rank if self._trainer is not None else 0
        return slice(rank * local_batch, (rank + 1) * local_batch)

    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def draw_normal(self, g: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        """Normal noise of a local-batch ``shape``, drawn for the global batch and sliced."""
        full = randn((shape[0] * self.world_size(), *shape[1:]), g, self.device)
        return full[self.rank_rows(shape[0])]

    def log_losses(self, loss: torch.Tensor, batch_size: int, **extra: torch.Tensor) -> None:
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        for name, value in extra.items():
            self.log(f"train/{name}", value, sync_dist=True, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)


class VAEModule(StepModule):
    """Trains an :class:`AutoencoderKL`: L1 + MSE reconstruction plus ``kl_weight`` x KL per latent element."""

    def __init__(self, vae: AutoencoderKL, optim: OptimConfig, kl_weight: float = 1e-4, seed: int = 0) -> None:
        super().__init__(optim, seed)
        self.vae = vae
        self.kl_weight = kl_weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["pixels"]
        g = self.step_generator(int(batch["step"][0]))
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * self.draw_normal(g, posterior.mean.shape)
        recon = self.vae.decode(z)
        l1 = (recon.float() - x).abs().mean()
        mse = ((recon.float() - x) ** 2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + mse + self.kl_weight * kl
        self.log_losses(loss, x.shape[0], l1=l1, mse=mse, kl=kl)
        return loss


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
    alone and the gradient runs back through ``k`` denoiser calls (``t_max`` is not used).
    """

    weight: float = 0.1
    t_max: float | None = None
    every: int = 1
    fraction: float = 0.25
    mode: str = "x0"
    k: int = 2
    sample_steps: int = 10

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
        if not 1 <= self.k <= self.sample_steps:
            raise ValueError(f"the cycle needs 1 <= k <= sample_steps, got {self.k} and {self.sample_steps}")

    def resolved_t_max(self, noise_process: NoiseProcess) -> float:
        """``t_max`` for ``noise_process``, its default filled in and its range checked."""
        if noise_process.kind == "flow":
            t_max = 0.2 if self.t_max is None else float(self.t_max)
            if t_max > 1:
                raise ValueError(f"flow matching times are in (0, 1]: the cycle t_max {t_max} is out of range")
            return t_max
        steps = noise_process.num_train_timesteps
        t_max = steps // 5 if self.t_max is None else self.t_max
        if t_max != int(t_max) or not 1 <= t_max <= steps:
            raise ValueError(f"Gaussian diffusion timesteps are integers: the cycle t_max must be in 1..{steps}")
        return int(t_max)


@dataclass
class StepLosses:
    """What one text-to-image step computed: the total ``loss``, the denoising term, the cycle term (or None)."""

    loss: torch.Tensor
    denoise: TrainingLoss
    cycle: torch.Tensor | None = None


class DiffusionModule(StepModule):
    """Trains a text encoder and a denoiser jointly under any noise process, in latent or pixel space.

    The VAE (optional) is frozen and kept out of the module tree. Captions are replaced by the empty
    prompt with probability ``caption_dropout`` so that the model also learns the unconditional
    prediction used by classifier-free guidance. With a ``captioner`` and a ``cycle`` of positive
    weight, the step adds the cycle-consistency term of :class:`CycleConfig`; the captioner, like the
    VAE, is frozen and stays out of the module tree (no optimiser, no EMA, no checkpoint, no export).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        text_encoder: TextEncoder,
        denoiser: torch.nn.Module,
        noise_process: NoiseProcess,
        vae: AutoencoderKL | None,
        optim: OptimConfig,
        caption_dropout: float = 0.1,
        train_text_encoder: bool = True,
        seed: int = 0,
        captioner: CaptionPipeline | None = None,
        cycle: CycleConfig | None = None,
    ) -> None:
        super().__init__(optim, seed)
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.caption_dropout = caption_dropout
        self.text_encoder.requires_grad_(train_text_encoder)
        if vae is not None:
            vae.eval().requires_grad_(False)
        self.cycle = cycle if captioner is not None and cycle is not None and cycle.weight > 0 else None
        if self.cycle is not None:
            self.cycle_t_max = self.cycle.resolved_t_max(noise_process)
            captioner.captioner.eval().requires_grad_(False)
        else:
            captioner = None
        self.shared = Shared(
            {"tokenizer": tokenizer, "noise_process": noise_process, "vae": vae, "captioner": captioner}
        )

    @property
    def tokenizer(self) -> Tokenizer:
        return self.shared.value["tokenizer"]

    @property
    def noise_process(self) -> NoiseProcess:
        return self.shared.value["noise_process"]

    @property
    def vae(self) -> AutoencoderKL | None:
        return self.shared.value["vae"]

    @property
    def captioner(self) -> CaptionPipeline | None:
        """The frozen captioner of the cycle term (None without one)."""
        return self.shared.value["captioner"]

    def on_fit_start(self) -> None:
        if self.vae is not None:
            self.vae.to(self.device)
        if self.captioner is not None:
            self.captioner.to(self.device)

    def to_pipeline(self) -> Text2ImagePipeline:
        """The inference pipeline made of this module's (current) weights."""
        return Text2ImagePipeline(self.tokenizer, self.text_encoder, self.vae, self.denoiser, self.noise_process)

    def clean_latents(self, batch: dict[str, Any], g: torch.Generator) -> torch.Tensor:
        """x0 for the noise process: sampled cached latents, freshly encoded images, or pixels."""
        if "latent_params" in batch:
            posterior = DiagonalGaussian(batch["latent_params"].float())
        elif self.vae is not None:
            with torch.no_grad():
                posterior = self.vae.encode(batch["pixels"])
        else:
            return batch["pixels"]
        z = posterior.mean + posterior.std * self.draw_normal(g, posterior.mean.shape)
        return self.vae.scale_latents(z).float()

    def step_losses(self, batch: dict[str, Any]) -> StepLosses:
        """The losses of one micro-batch; every random number is keyed to ``batch["step"]``."""
        step = int(batch["step"][0])
        g = self.step_generator(step)
        captions: list[str] = list(batch["caption"])
        local = len(captions)
        world = self.world_size()
        rows = self.rank_rows(local)

        x0 = self.clean_latents(batch, g)
        drop = (torch.rand(local * world, generator=g, device=self.device) < self.caption_dropout)[rows]
        kept = ["" if d else c for c, d in zip(captions, drop.tolist())]
        t = self.noise_process.sample_timesteps(local * world, self.device, g)[rows]
        noise = self.draw_normal(g, x0.shape)

        ids = self.tokenizer(kept).input_ids.to(self.device)
        text = self.text_encoder(ids)

        def model_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x, s, text.hidden_states, text.pooled)

        denoise = self.noise_process.training_loss(model_fn, x0, noise=noise, t=t)
        loss = denoise.loss.mean()
        cycle = None
        if self.cycle is not None and self.cycle_due(step):
            cycle = self.cycle_loss(x0, captions, self.step_generator(step, CYCLE_STREAM))
            loss = loss + self.cycle.weight * cycle
        return StepLosses(loss, denoise, cycle)

    def cycle_due(self, step: int) -> bool:
        """Whether micro-batch ``step`` belongs to an optimiser step that carries the cycle term."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return (step // accumulate) % self.cycle.every == 0

    def cycle_loss(self, x0: torch.Tensor, captions: list[str], g: torch.Generator) -> torch.Tensor:
        """The captioner's loss on the one-step ``x0_hat`` of some rows of this batch (see :class:`CycleConfig`).

        Rows, times and noise are drawn for the global batch from ``g`` and sliced to this rank, and the
        per-caption losses are summed and divided by the global number of cycle rows, so that ranks
        averaging their gradients reproduce one process's mean.
        """
        local, world = len(captions), self.world_size()
        total = local * world
        count = max(1, round(self.cycle.fraction * total))
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.randperm(total, generator=g, device=g.device)[:count].cpu()] = True
        last_k = self.cycle.mode == "last-k"
        t = None if last_k else self.low_noise_timesteps(total, g)[self.rank_rows(local)]
        noise = self.draw_normal(g, x0.shape)
        index = chosen[self.rank_rows(local)].nonzero().squeeze(1).to(self.device)
        if index.numel() == 0:  # this rank drew no cycle rows this step
            return x0.new_zeros(())
        texts = [captions[i] for i in index.tolist()]
        text = self.text_encoder(self.tokenizer(texts).input_ids.to(self.device))
        if last_k:
            x0_hat = self.draw_last_k(noise[index], text)
        else:
            process, x0, t = self.noise_process, x0[index], t[index]
            x_t = process.add_noise(x0, noise[index], t)
            prediction = self.denoiser(x_t, process.model_time(t), text.hidden_states, text.pooled)
            x0_hat, _ = process.to_x0_eps(prediction.float(), x_t, t)
        pixels = x0_hat if self.vae is None else self.vae.decode_latents(x0_hat)
        per_caption = self.captioner.loss(pixels, texts, reduction="none")
        return per_caption.sum() * world / count

    def draw_last_k(self, noise: torch.Tensor, text: TextEncoderOutput) -> torch.Tensor:
        """Sample from ``noise`` under ``text``: the cycle's sampler steps, gradient through the last ``k``."""
        process = self.noise_process
        grid = process.grid(self.cycle.sample_steps)
        head, tail = grid[: -self.cycle.k], grid[-self.cycle.k :]

        def model_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x, s, text.hidden_states, text.pooled).float()

        with torch.no_grad():
            x = process.denoise(model_fn, noise, head)
        return process.denoise(model_fn, x, tail)

    def low_noise_timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` times uniform below the cycle's ``t_max``, in the noise process's units."""
        if self.noise_process.kind == "flow":
            return (torch.rand(n, generator=g, device=g.device) * self.cycle_t_max).to(self.device)
        return torch.randint(0, int(self.cycle_t_max), (n,), generator=g, device=g.device).to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.step_losses(batch)
        local = len(batch["caption"])
        extra = {}
        if self.cycle is not None:
            extra["denoise_loss"] = out.denoise.loss.mean()
            if out.cycle is not None:
                extra["cycle_loss"] = out.cycle
        self.log_losses(out.loss, local, **extra)
        bins = (out.denoise.level * LOSS_BINS).long().clamp(max=LOSS_BINS - 1)
        for b in range(LOSS_BINS):
            mask = bins == b
            if mask.any():
                self.log(f"loss_by_noise/bin{b}", out.denoise.loss[mask].mean(), batch_size=int(mask.sum()))
        return out.loss


class CaptionerModule(StepModule):
    """Trains a :class:`Captioner` on captioned images: teacher-forced cross-entropy, padding ignored.

    The tokenizer stays out of the module tree; the step has no randomness of its own.
    """

    def __init__(self, tokenizer: Tokenizer, captioner: Captioner, optim: OptimConfig, seed: int = 0) -> None:
        super().__init__(optim, seed)
        self.captioner = captioner
        self.shared = Shared({"tokenizer": tokenizer})
        check_compatible(tokenizer, captioner)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.shared.value["tokenizer"]

    def to_pipeline(self) -> CaptionPipeline:
        """The inference pipeline made of this module's (current) weights."""
        return CaptionPipeline(self.tokenizer, self.captioner)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        ids = self.tokenizer(list(batch["caption"])).input_ids.to(self.device)
        loss = self.captioner.loss(batch["pixels"], ids)
        self.log_losses(loss, ids.shape[0])
        return loss
