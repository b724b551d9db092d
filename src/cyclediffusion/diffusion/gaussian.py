"""Discrete-time Gaussian diffusion (DDPM/DDIM): schedule, training targets, loss and samplers.

Notation: ``a_t`` is ``alphas_cumprod[t]`` and ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``.
The network may predict ``epsilon``, ``x0`` or ``v_prediction`` (``v = sqrt(a_t) eps - sqrt(1-a_t) x0``);
:meth:`GaussianDiffusion.to_x0_eps` is the one conversion every sampler (and CycleDiffusion) uses.
A timestep of -1 stands for the clean end of the chain (``a = 1``, or ``a_0`` when
``set_alpha_to_one`` is False, as in Stable Diffusion's scheduler config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Configurable
from .base import Generator, ModelFn, NoiseProcessBase, StepCallback, broadcast, expand_time
from .schedules import BETA_SCHEDULES, SPACINGS, make_betas, spaced_timesteps

PREDICTION_TYPES = ("epsilon", "x0", "v_prediction")
_ALIASES = {"sample": "x0", "v": "v_prediction", "eps": "epsilon"}
SAMPLERS = ("ddim", "ddpm", "dpm++2m")


def canonical_prediction_type(name: str) -> str:
    """``epsilon``, ``x0`` or ``v_prediction`` (accepts diffusers' ``sample`` and short forms)."""
    name = _ALIASES.get(name, name)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {name!r}; choose from {', '.join(PREDICTION_TYPES)}")
    return name


@dataclass
class GaussianConfig:
    """Settings of :class:`GaussianDiffusion` (names follow diffusers' schedulers where they exist)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        self.prediction_type = canonical_prediction_type(self.prediction_type)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {self.beta_schedule!r}; choose from {BETA_SCHEDULES}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.timestep_spacing!r}; choose from {SPACINGS}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive (or None for no weighting), got {self.snr_gamma}")


class GaussianDiffusion(NoiseProcessBase, Configurable):
    """Owns the schedule, the training target and loss, and the DDIM / ancestral DDPM samplers."""

    config_class = GaussianConfig

    def __init__(self, config: GaussianConfig | None = None) -> None:
        self.config = config or GaussianConfig()
        c = self.config
        self.betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.final_alpha_cumprod = 1.0 if c.set_alpha_to_one else float(self.alphas_cumprod[0])

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    # ----------------------------------------------------------------- schedule lookups
    def alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``a_t`` for integer timesteps (scalar or (B,)), shaped to broadcast against ``like``.

        t = -1 (or any negative t) is the clean end of the chain.
        """
        t = expand_time(t, like.shape[0], torch.device("cpu"), torch.long).cpu()
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.tensor(self.final_alpha_cumprod))
        return broadcast(a.float(), like)

    def alpha_sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(a_t), sqrt(1 - a_t))``, shaped to broadcast against ``like``."""
        a = self.alpha_bar(t, like)
        return a.sqrt(), (1 - a).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``a_t / (1 - a_t)`` for (B,) integer timesteps (float32)."""
        a = self.alphas_cumprod[t.cpu()]
        return (a / (1 - a)).float().to(t.device)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network sees: the integer timestep as float (0..T-1)."""
        return t.float()

    def path_time(self, model_time: torch.Tensor) -> torch.Tensor:
        """The integer timestep of a network time."""
        return model_time.round().long()

    # ----------------------------------------------------------------- forward process
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
        a = self.alpha_bar(t, x0)
        return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The regression target of the configured prediction type."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "x0":
            return x0
        a = self.alpha_bar(t, x0)
        return (a.sqrt() * noise - (1 - a).sqrt() * x0).to(x0.dtype)

    def to_x0_eps(
        self,
        prediction: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        prediction_type: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network prediction of any type at ``x_t`` into ``(x0_hat, eps_hat)``."""
        kind = canonical_prediction_type(prediction_type or self.prediction_type)
        a = self.alpha_bar(t, x_t)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        if kind == "epsilon":
            eps = prediction
            x0 = (x_t - s1a * eps) / sa
        elif kind == "x0":
            x0 = prediction
            eps = (x_t - sa * x0) / s1a
        else:
            x0 = sa * x_t - s1a * prediction
            eps = sa * prediction + s1a * x_t
        return x0, eps

    # ----------------------------------------------------------------- training
    def sample_timesteps(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None):
        """Uniform integer timesteps in [0, T)."""
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights (Hang et al. 2023) for the configured target, or None (uniform)."""
        gamma = self.config.snr_gamma
        if gamma is None:
            return None
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "x0":
            return clipped
        return clipped / (snr + 1)

    def low_noise_bound(self, t_max: float | None = None) -> float:
        """An integer timestep in 1..T; T // 5 by default."""
        steps = self.num_train_timesteps
        t_max = steps // 5 if t_max is None else t_max
        if t_max != int(t_max) or not 1 <= t_max <= steps:
            raise ValueError(f"Gaussian diffusion timesteps are integers: the time bound must be in 1..{steps}")
        return int(t_max)

    def times_below(self, n: int, t_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, int(t_max), (n,), generator=generator, device=device)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as a fraction of the schedule, in [0, 1]."""
        return t.float() / (self.num_train_timesteps - 1)

    # ----------------------------------------------------------------- sampling
    def timesteps(self, num_inference_steps: int, spacing: str | None = None) -> torch.Tensor:
        """Descending timesteps of a ``num_inference_steps`` sampler."""
        return spaced_timesteps(
            self.num_train_timesteps,
            num_inference_steps,
            spacing or self.config.timestep_spacing,
            self.config.steps_offset,
        )

    def ddim_sigma(self, t: torch.Tensor | int, t_prev: torch.Tensor | int, eta: float, like: torch.Tensor):
        """DDIM's ``eta sqrt((1 - a_p)/(1 - a_t)) sqrt(1 - a_t/a_p)``: the base class's quantity, computed from the
        ``a``'s directly as diffusers does (no square roots squared again, so long chains agree to float error)."""
        a_t, a_p = self.alpha_bar(t, like), self.alpha_bar(t_prev, like)
        return eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).clamp(min=0).sqrt()

    def grid(self, num_inference_steps: int, spacing: str | None = None) -> list[tuple[int, int]]:
        """``(t, t_prev)`` pairs of the sampler's timesteps; the last ``t_prev`` is -1, the clean end."""
        steps = self.timesteps(num_inference_steps, spacing).tolist()
        return list(zip(steps, [*steps[1:], -1]))

    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        num_inference_steps: int = 50,
        sampler: str | None = None,
        eta: float = 0.0,
        spacing: str | None = None,
        generator: Generator = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Draw ``x0`` from pure noise: ``ddim`` (default; given eta), ``ddpm`` (ancestral, eta = 1) or ``dpm++2m``
        (DPM-Solver++(2M), deterministic, for few steps)."""
        sampler = sampler or "ddim"
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for Gaussian diffusion; choose from {SAMPLERS}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if sampler == "dpm++2m":
            if eta != 0:
                raise ValueError(f"eta={eta}: dpm++2m is deterministic; eta must be 0")
            return self.dpm_solver_2m(model_fn, noise, self.grid(num_inference_steps, spacing), callback)
        eta = 1.0 if sampler == "ddpm" else eta
        return self.denoise(model_fn, noise, self.grid(num_inference_steps, spacing), eta, generator, callback)
