"""LightningModules: what one training step of the VAE or of the text-to-image model computes.

Randomness is keyed to the step, not to a global RNG: each micro-batch carries its step index, and
the noise, timesteps, caption dropout and VAE posterior samples are drawn for the whole global batch
from a generator seeded with ``(seed, step)`` and then sliced to this rank's rows. A run resumed from
a checkpoint, or split over several processes, therefore sees exactly the numbers of one
uninterrupted single-process run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from ..diffusion import NoiseProcess
from ..diffusion.base import randn
from ..models import AutoencoderKL, DiagonalGaussian, TextEncoder
from ..pipelines import Text2ImagePipeline
from ..text import Tokenizer

LOSS_BINS = 4


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
    def step_generator(self, step: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + int(step))
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


class DiffusionModule(StepModule):
    """Trains a text encoder and a denoiser jointly under any noise process, in latent or pixel space.

    The VAE (optional) is frozen and kept out of the module tree. Captions are replaced by the empty
    prompt with probability ``caption_dropout`` so that the model also learns the unconditional
    prediction used by classifier-free guidance.
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
    ) -> None:
        super().__init__(optim, seed)
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.shared = Shared({"tokenizer": tokenizer, "noise_process": noise_process, "vae": vae})
        self.caption_dropout = caption_dropout
        self.text_encoder.requires_grad_(train_text_encoder)
        if vae is not None:
            vae.eval().requires_grad_(False)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.shared.value["tokenizer"]

    @property
    def noise_process(self) -> NoiseProcess:
        return self.shared.value["noise_process"]

    @property
    def vae(self) -> AutoencoderKL | None:
        return self.shared.value["vae"]

    def on_fit_start(self) -> None:
        if self.vae is not None:
            self.vae.to(self.device)

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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step = int(batch["step"][0])
        g = self.step_generator(step)
        captions: list[str] = list(batch["caption"])
        local = len(captions)
        world = self.world_size()
        rows = self.rank_rows(local)

        x0 = self.clean_latents(batch, g)
        drop = (torch.rand(local * world, generator=g, device=self.device) < self.caption_dropout)[rows]
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        t = self.noise_process.sample_timesteps(local * world, self.device, g)[rows]
        noise = self.draw_normal(g, x0.shape)

        ids = self.tokenizer(captions).input_ids.to(self.device)
        text = self.text_encoder(ids)

        def model_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x, s, text.hidden_states, text.pooled)

        out = self.noise_process.training_loss(model_fn, x0, noise=noise, t=t)
        loss = out.loss.mean()
        self.log_losses(loss, local)
        bins = (out.level * LOSS_BINS).long().clamp(max=LOSS_BINS - 1)
        for b in range(LOSS_BINS):
            mask = bins == b
            if mask.any():
                self.log(f"loss_by_noise/bin{b}", out.loss[mask].mean(), batch_size=int(mask.sum()))
        return loss
