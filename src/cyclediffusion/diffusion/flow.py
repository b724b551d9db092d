"""Flow matching (rectified flow): the straight path from data to noise, its velocity target and ODE samplers.

Path ``x_t = (1 - t) x0 + t eps`` for t in [0, 1] (t = 1 is pure noise); the network predicts the
velocity ``v = eps - x0``. The network sees ``1000 t`` so that the sinusoidal time embedding
spans the same range as for Gaussian diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Configurable
from .base import Generator, ModelFn, NoiseProcessBase, StepCallback, broadcast, expand_time

TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun", "dpm++2m")
TIME_SCALE = 1000.0


@dataclass
class FlowConfig:
    """Settings of :class:`FlowMatching`.

    ``logit_normal`` training times (SD3) put more weight on the middle of the path than
    ``uniform``; ``shift`` > 1 moves sampler steps towards the noisy end (1 = evenly spaced).
    """

    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.time_sampling!r}; choose from {TIME_SAMPLINGS}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")


class FlowMatching(NoiseProcessBase, Configurable):
    """Owns the flow-matching path, the velocity loss and the Euler / Heun samplers."""

    config_class = FlowConfig
    prediction_type = "velocity"

    def __init__(self, config: FlowConfig | None = None) -> None:
        self.config = config or FlowConfig()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network sees: ``1000 t``."""
        return t.float() * TIME_SCALE

    def path_time(self, model_time: torch.Tensor) -> torch.Tensor:
        """``model_time / 1000``."""
        return model_time.float() / TIME_SCALE

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``x_t = (1 - t) x0 + t noise``."""
        t = broadcast(expand_time(t, x0.shape[0], x0.device, torch.float32), x0)
        return ((1 - t) * x0 + t * noise).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """The velocity ``noise - x0`` (the same at every t)."""
        return noise - x0

    def to_x0_eps(
        self, velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a velocity prediction at ``x_t`` into ``(x0_hat, eps_hat)``."""
        t = broadcast(expand_time(t, x_t.shape[0], x_t.device, torch.float32), x_t)
        return x_t - t * velocity, x_t + (1 - t) * velocity

    def sample_timesteps(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None):
        """Training times in (0, 1): uniform or logit-normal."""
        gen_device = generator.device if generator is not None else "cpu"
        if self.config.time_sampling == "uniform":
            t = torch.rand(batch, generator=generator, device=gen_device)
        else:
            z = torch.randn(batch, generator=generator, device=gen_device)
            t = torch.sigmoid(self.config.logit_mean + self.config.logit_std * z)
        return t.to(device)

    def low_noise_bound(self, t_max: float | None = None) -> float:
        """Path time in (0, 1]; 0.2 by default."""
        t_max = 0.2 if t_max is None else float(t_max)
        if not 0 < t_max <= 1:
            raise ValueError(f"flow matching times are in (0, 1]: the time bound {t_max} is out of range")
        return t_max

    def times_below(self, n: int, t_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else "cpu"
        return torch.rand(n, generator=generator, device=device) * t_max

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """The path time itself (0 = data, 1 = noise)."""
        return t.float()

    def times(self, num_inference_steps: int) -> torch.Tensor:
        """``num_inference_steps + 1`` descending times from 1 to 0, shifted by ``config.shift``."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        t = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        s = self.config.shift
        return (s * t / (1 + (s - 1) * t)).float()

    def alpha_sigma(self, t: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - t, t)``, shaped to broadcast against ``like``."""
        t = broadcast(expand_time(t, like.shape[0], like.device, torch.float32), like)
        return 1 - t, t

    def grid(self, num_inference_steps: int) -> list[tuple[float, float]]:
        """``(t, t_prev)`` pairs of :meth:`times`, ending at t = 0."""
        times = self.times(num_inference_steps).tolist()
        return list(zip(times[:-1], times[1:]))

    def euler_step(self, velocity: torch.Tensor, x_t: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """One Euler step along the predicted velocity (the same as :meth:`step` with eta = 0)."""
        return (x_t + (t_next - t) * velocity).to(x_t.dtype)

    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        num_inference_steps: int = 50,
        sampler: str | None = None,
        eta: float = 0.0,
        generator: Generator = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Integrate the ODE from noise (t = 1) to data (t = 0) with ``euler`` (default), ``heun`` or ``dpm++2m``
        (DPM-Solver++(2M), second order at one call per step) steps.

        Heun uses two network calls per step except the last (to t = 0), which is an Euler step. With ``eta`` in
        (0, 1] the ``euler`` sampler becomes DDIM's stochastic step on the flow path (:meth:`denoise`: eta = 1 draws
        each step from the posterior given the model's x0 estimate, with noise from ``generator``); ``heun`` and
        ``dpm++2m`` are deterministic only.
        """
        sampler = sampler or "euler"
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for flow matching; choose from {SAMPLERS}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if eta != 0:
            if sampler != "euler":
                raise ValueError(f"eta={eta}: {sampler} is deterministic; eta must be 0 (or use euler)")
            return self.denoise(model_fn, noise, self.grid(num_inference_steps), eta, generator, callback)
        if sampler == "dpm++2m":
            return self.dpm_solver_2m(model_fn, noise, self.grid(num_inference_steps), callback)
        x = noise
        times = self.times(num_inference_steps).tolist()
        batch = x.shape[0]

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            return model_fn(x, self.model_time(torch.full((batch,), t, device=x.device)))

        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            v = velocity(x, t)
            x_euler = self.euler_step(v, x, t, t_next)
            if sampler == "heun" and t_next > 0:
                v = (v + velocity(x_euler, t_next)) / 2
                x = self.euler_step(v, x, t, t_next)
            else:
                x = x_euler
            if callback is not None:
                callback(i, torch.tensor(t * TIME_SCALE), x)
        return x
