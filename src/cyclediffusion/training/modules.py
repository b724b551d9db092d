"""LightningModules: what one training step of the VAE, the text-to-image model or the captioner computes.

Randomness is keyed to the step, not to a global RNG: each micro-batch carries its step index, and
the noise, timesteps, caption dropout and VAE posterior samples are drawn for the whole global batch
from a generator seeded with ``(seed, step)`` and then sliced to this rank's rows. A run resumed from
a checkpoint, or split over several processes, therefore sees exactly the numbers of one
uninterrupted single-process run.

The text-to-image step may add a cycle-consistency term (:mod:`~cyclediffusion.training.caption_loss`). A step
whose loss is not finite stops the run with :class:`NonFiniteLossError` before its update.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from ..diffusion import NoiseProcess
from ..diffusion.base import TrainingLoss, immiscible, randn
from ..models import AutoencoderKL, Captioner, DiagonalGaussian, TextEncoder
from ..pipelines import Text2ImagePipeline
from ..pipelines.caption import CaptionPipeline, check_compatible
from ..text import Tokenizer
from .callbacks import run_share
from .caption_loss import CYCLE_STREAM, CycleLoss
from .optimizers import OPTIMIZERS, build_optimizer
from .options import LR_SCHEDULES, CycleConfig
from .repa import FrozenEncoder, RepresentationAlignment

LOSS_BINS = 10  # the denoising loss is logged per tenth of the noise scale (loss_by_noise/bin0 = cleanest)


class NonFiniteLossError(ArithmeticError):
    """Training stopped at a loss that is NaN or infinite (before the step's update, so nothing is overwritten)."""


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule: AdamW (or ``muon``: Muon for the hidden layers' weight matrices, AdamW
    for the rest; :mod:`~.optimizers`), linear warmup, then constant, cosine decay, or ``wsd`` (warmup-stable-decay:
    constant, then linear to zero over the last ``decay_share`` of the run).

    The decays run over ``total_steps``, or over a time budget (``timed``): then their progress is the
    share of the budget spent, ``time_fraction``, which the module updates before every step from
    Lightning's timer. With both, whichever runs out first sets the pace.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "constant"
    total_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    timed: bool = False
    time_fraction: float = 0.0
    decay_share: float = 0.2
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimiser {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
        if self.schedule != "constant" and not (self.total_steps or self.timed):
            raise ValueError(
                f"the {self.schedule} LR schedule needs the length of the run (--steps, --epochs or --minutes)"
            )
        if not 0 < self.decay_share <= 1:
            raise ValueError(f"decay_share must be in (0, 1], got {self.decay_share}")

    def factor(self, step: int) -> float:
        """LR multiplier at optimiser step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = self.time_fraction if self.timed else 0.0
        if self.total_steps:
            progress = max(progress, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        progress = min(1.0, progress)
        if self.schedule == "wsd":
            return min(1.0, (1.0 - progress) / self.decay_share)
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
        self.progress = 0.0  # share of the run done: steps of max_steps, or time of the budget (whichever leads)
        self.logged_names: set[str] = set()  # metrics logged since metrics.jsonl's last line

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run trains at the learning rate it is given now (a lower one after a divergence, say): the
        schedule's base rates and the optimiser's current rate are rewritten before Lightning restores them."""
        for sched in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in sched:
                sched["base_lrs"] = [self.optim.lr] * len(sched["base_lrs"])
                current = self.optim.lr * self.optim.factor(int(sched.get("last_epoch", 0)))
                for state in checkpoint.get("optimizer_states", []):
                    for group in state.get("param_groups", []):
                        group["initial_lr"], group["lr"] = self.optim.lr, current

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``, remembering the name for :class:`~.callbacks.MetricsFile`."""
        self.logged_names.add(name)
        super().log(name, value, *args, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Before each step: how much of the run is done (``progress``), and of its time budget (Lightning's timer,
        resumes included), which a timed cosine schedule follows."""
        self.progress, fraction = run_share(self.trainer)
        if fraction is not None:
            self.optim.time_fraction = fraction

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients that are not finite stop the run before they reach the weights (as a non-finite loss does).

        They are averaged over the ranks by now, so every rank stops together. Under fp16 mixed precision the
        gradient scaler skips such steps itself, and they are left to it.
        """
        if self._trainer is not None and str(self.trainer.precision).startswith("16"):
            return
        grads = [p.grad.detach() for p in self.trainable_parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):  # one fused pass, ~2 ms a step
            self.stop_non_finite("the gradients are not finite")

    def stop_non_finite(self, what: str) -> None:
        step = self.trainer.global_step if self._trainer is not None else 0
        raise NonFiniteLossError(
            f"{what} at step {step}: stopped before that step's update; the last checkpoint and export are "
            "untouched (resume with a lower --lr, or keep --grad-clip on)"
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        # the fused AdamW kernel (CUDA and CPU) updates every tensor in one call: 1.5 ms a step for the demo's 1.6M
        # parameters on 2 CPU cores, against 8 ms for the default per-tensor loop (same maths)
        o = self.optim
        fused = self.device.type in ("cuda", "cpu")
        opt = build_optimizer(o.optimizer, self, o.lr, o.weight_decay, o.betas, fused)
        # A fused optimiser can take GradScaler's scale into its kernel, and Lightning then refuses to clip
        # gradients. Without the flag GradScaler unscales the gradients before the step (as for any optimiser), so
        # clipping sees true gradients under fp16 and bf16 alike.
        opt._step_supports_amp_scaling = False
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
        """Log the step's losses; a loss that is not finite stops the run (its gradients never reach the weights).

        Under DDP one rank's loss is not the others', so the check is left to the averaged gradients there."""
        if self.world_size() == 1 and not torch.isfinite(loss.detach()).all():
            self.stop_non_finite(f"the training loss is {float(loss.detach())}")
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
class StepLosses:
    """What one text-to-image step computed: the total ``loss``, the denoising term, the cycle term (or None)."""

    loss: torch.Tensor
    denoise: TrainingLoss
    cycle: torch.Tensor | None = None
    repa: torch.Tensor | None = None


class DiffusionModule(StepModule):
    """Trains a text encoder and a denoiser jointly under any noise process, in latent or pixel space.

    The VAE (optional) is frozen and kept out of the module tree. Captions are replaced by the empty
    prompt with probability ``caption_dropout`` so that the model also learns the unconditional
    prediction used by classifier-free guidance. With a ``captioner`` and a ``cycle`` of positive
    weight, the step adds the cycle-consistency term of :class:`~.caption_loss.CycleLoss`; the captioner, like the
    VAE, is frozen and stays out of the module tree (no optimiser, no EMA, no checkpoint, no export).
    ``guidance_scale`` is stored with the exported pipeline as its default. ``immiscible_noise`` pairs each
    image of the batch with a nearby noise draw (:func:`~cyclediffusion.diffusion.immiscible`); under DDP each
    rank pairs its own rows, so that option alone makes a split run differ from a single-process one. A
    ``repa_encoder`` adds ``repa_weight`` x the representation-alignment loss of :mod:`~.repa` until ``repa_until``
    of the run is done. With ``self_condition`` p > 0 (a self-conditioned denoiser), a share p of the steps first
    runs the denoiser without gradient and feeds its x0 estimate back as ``x_self_cond`` (Chen et al. 2023); the
    other steps feed nothing (zeros), as every call that keeps no estimate does.
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
        guidance_scale: float | None = None,
        immiscible_noise: bool = False,
        repa_encoder: FrozenEncoder | None = None,
        repa_weight: float = 0.5,
        repa_until: float = 1.0,
        captioner_device: str | None = None,
        self_condition: float = 0.0,
    ) -> None:
        super().__init__(optim, seed)
        if not 0 <= self_condition <= 1:
            raise ValueError(f"self-conditioning is a probability in [0, 1], got {self_condition}")
        if self_condition > 0 and not denoiser.self_conditioned:
            raise ValueError("self-conditioning needs a denoiser built with self_condition=True")
        self.self_condition = self_condition
        self.immiscible_noise = immiscible_noise
        self._loss_bins: torch.Tensor | None = None  # (sum, count) per noise bin since the last logged step
        self.repa = RepresentationAlignment(denoiser, repa_encoder.dim) if repa_encoder is not None else None
        self.repa_weight, self.repa_until = repa_weight, repa_until
        self.captioner_device = captioner_device
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.caption_dropout = caption_dropout
        self.text_encoder.requires_grad_(train_text_encoder)
        if vae is not None:
            vae.eval().requires_grad_(False)
        active = captioner is not None and cycle is not None and cycle.weight > 0
        self.cycle = CycleLoss(cycle, captioner, noise_process) if active else None
        self.guidance_scale = guidance_scale
        self.shared = Shared({"tokenizer": tokenizer, "noise_process": noise_process, "vae": vae})
        self.shared.value["repa_encoder"] = repa_encoder

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
        return None if self.cycle is None else self.cycle.captioner

    def on_fit_start(self) -> None:
        if self.vae is not None:
            self.vae.to(self.device)
        if self.captioner is not None:
            self.captioner.to(self.captioner_device or self.device)

    def to_pipeline(self) -> Text2ImagePipeline:
        """The inference pipeline made of this module's (current) weights."""
        return Text2ImagePipeline(
            self.tokenizer, self.text_encoder, self.vae, self.denoiser, self.noise_process, self.guidance_scale
        )

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

    def clean_pixels(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's images in [-1, 1]: loaded, or decoded from the cached latents' means (for REPA's encoder)."""
        if "pixels" in batch:
            return batch["pixels"]
        with torch.no_grad():
            return self.vae.decode(DiagonalGaussian(batch["latent_params"].float()).mean).clamp(-1, 1)

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
        if self.immiscible_noise:
            noise = immiscible(x0, noise)

        estimate = self.self_condition > 0 and bool(torch.rand((), generator=g, device=g.device) < self.self_condition)

        ids = self.tokenizer(kept).input_ids.to(self.device)
        text = self.text_encoder(ids)

        def model_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            denoise = functools.partial(self.denoiser, x, s, text.hidden_states, text.pooled, text.mask)
            if not estimate:
                return denoise()
            with torch.no_grad():
                x0_hat = self.noise_process.to_x0_eps(denoise().float(), x, t)[0]
            return denoise(x_self_cond=x0_hat)

        align = self.repa is not None and self.progress < self.repa_until
        with self.repa.capture() if align else contextlib.nullcontext():
            denoise = self.noise_process.training_loss(model_fn, x0, noise=noise, t=t)
        loss = denoise.loss.mean()
        repa = None
        if align:
            repa = self.repa.loss(self.shared.value["repa_encoder"](self.clean_pixels(batch)))
            loss = loss + self.repa_weight * repa
        cycle = None
        if self.cycle is not None and self.cycle_due(step):
            cycle = self.cycle.loss(self, x0, captions, self.step_generator(step, CYCLE_STREAM))
            loss = loss + self.cycle.config.weight * cycle
        return StepLosses(loss, denoise, cycle, repa)

    def cycle_due(self, step: int) -> bool:
        """Whether micro-batch ``step`` belongs to an optimiser step that carries the cycle term."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return self.progress >= self.cycle.config.start and self.cycle.due(step, accumulate)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.step_losses(batch)
        local = len(batch["caption"])
        extra = {} if out.repa is None else {"repa_loss": out.repa}
        if self.cycle is not None or self.repa is not None:
            extra["denoise_loss"] = out.denoise.loss.mean()
        if out.cycle is not None:
            extra["cycle_loss"] = out.cycle
        self.log_losses(out.loss, local, **extra)
        self.log_loss_by_noise(out.denoise)
        return out.loss

    def log_loss_by_noise(self, denoise: TrainingLoss) -> None:
        """Sums the denoising loss per tenth of the noise scale over the steps since the last logging step and logs
        each bin's mean there (``loss_by_noise/bin0`` .. ``bin9``): one scatter per step, ten logs per interval."""
        loss = denoise.loss.detach().float()
        bins = (denoise.level.detach() * LOSS_BINS).long().clamp(0, LOSS_BINS - 1)
        if self._loss_bins is None or self._loss_bins.device != loss.device:
            self._loss_bins = torch.zeros(2, LOSS_BINS, device=loss.device)
        self._loss_bins[0].index_add_(0, bins, loss)
        self._loss_bins[1].index_add_(0, bins, torch.ones_like(loss))
        if self._trainer is not None:
            step, every = self.trainer.global_step, max(1, self.trainer.log_every_n_steps)
            if step and (step + 1) % every:
                return  # not a step whose metrics are written (MetricsFile, TensorBoard)
        sums, counts = self._loss_bins.tolist()
        self._loss_bins.zero_()
        for b, (total, n) in enumerate(zip(sums, counts)):
            if n:
                self.log(f"loss_by_noise/bin{b}", total / n, batch_size=int(n))


class CaptionerModule(StepModule):
    """Trains a :class:`Captioner` on captioned images: teacher-forced cross-entropy, padding ignored.

    With ``estimates`` (a frozen text-to-image pipeline), a share ``estimate_fraction`` of each batch's images is
    replaced by that model's one-step estimates of them: the image is encoded, noised at a time drawn as in the
    model's training, denoised once under its own caption and decoded. The caption stays the image's true one, so
    the captioner learns to read what the model makes of a picture (never a generated image labelled with the
    prompt that made it, which would let the two models agree on what is not drawn). The tokenizer and the frozen
    pipeline stay out of the module tree; the rows, times and noise are keyed to the step.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        captioner: Captioner,
        optim: OptimConfig,
        seed: int = 0,
        estimates: Text2ImagePipeline | None = None,
        estimate_fraction: float = 0.5,
    ) -> None:
        super().__init__(optim, seed)
        self.captioner = captioner
        self.shared = Shared({"tokenizer": tokenizer, "estimates": estimates})
        self.estimate_fraction = estimate_fraction
        check_compatible(tokenizer, captioner)
        if estimates is not None:
            estimates.eval()
            for module in estimates.modules:
                module.requires_grad_(False)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.shared.value["tokenizer"]

    def on_fit_start(self) -> None:
        if self.shared.value["estimates"] is not None:
            self.shared.value["estimates"].to(self.device)

    def to_pipeline(self) -> CaptionPipeline:
        """The inference pipeline made of this module's (current) weights."""
        return CaptionPipeline(self.tokenizer, self.captioner)

    @torch.no_grad()
    def with_estimates(self, pixels: torch.Tensor, captions: list[str], step: int) -> torch.Tensor:
        """``pixels`` with the chosen rows replaced by the frozen model's one-step estimates of them."""
        pipe: Text2ImagePipeline = self.shared.value["estimates"]
        g = self.step_generator(step)
        local, world = pixels.shape[0], self.world_size()
        rows = self.rank_rows(local)
        chosen = (torch.rand(local * world, generator=g, device=self.device) < self.estimate_fraction)[rows]
        process = pipe.noise_process
        t = process.sample_timesteps(local * world, self.device, g)[rows]
        index = chosen.nonzero().squeeze(1)
        if index.numel() == 0:
            return pixels
        chosen_pixels = pixels[index]  # only the rows replaced go through the VAE
        x0 = chosen_pixels if pipe.vae is None else pipe.vae.scale_latents(pipe.vae.encode(chosen_pixels).mean).float()
        noise = self.draw_normal(g, (local, *x0.shape[1:]))[index]  # drawn for the global batch, as every step's
        t = t[index]
        x_t = process.add_noise(x0, noise, t)
        text = pipe.encode_prompt([captions[i] for i in index.tolist()])
        prediction = pipe.denoiser(x_t, process.model_time(t), text.context, text.pooled, text.mask)
        x0_hat, _ = process.to_x0_eps(prediction.float(), x_t, t)
        out = pixels.clone()
        out[index] = pipe.latents_to_pixels(x0_hat).clamp(-1, 1).to(pixels.dtype)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = list(batch["caption"])
        ids = self.tokenizer(captions).input_ids.to(self.device)
        pixels = batch["pixels"]
        if self.shared.value["estimates"] is not None:
            pixels = self.with_estimates(pixels, captions, int(batch["step"][0]))
        loss = self.captioner.loss(pixels, ids)
        self.log_losses(loss, ids.shape[0])
        return loss
