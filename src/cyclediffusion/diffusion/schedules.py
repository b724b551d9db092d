"""Noise schedules (betas) and inference timestep spacings for discrete-time Gaussian diffusion."""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal's cumulative signal level at continuous time ``t`` in [0, 1]."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(
    schedule: str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Betas (float64) for ``linear``, ``scaled_linear`` (SD's, linear in sqrt) or ``cosine``.

    The cosine schedule derives each beta from the closed form ``alpha_bar`` and clips it at
    ``max_beta``; ``beta_start``/``beta_end`` are ignored there.
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        betas = [
            min(1 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose from {', '.join(BETA_SCHEDULES)}")


def spaced_timesteps(num_train: int, num_steps: int, spacing: str = "leading", offset: int = 0) -> torch.Tensor:
    """Descending integer timesteps for a ``num_steps`` sampler (the spacings of Lin et al. 2023).

    ``leading``: 0, k, 2k, ... (k = T // n) plus ``offset``; ``trailing``: T-1 down in steps of T/n,
    so the first step starts at pure noise; ``linspace``: n points evenly from 0 to T-1.
    """
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_inference_steps must be in [1, {num_train}], got {num_steps}")
    if spacing == "leading":
        ratio = num_train // num_steps
        steps = (np.arange(num_steps) * ratio).round()[::-1] + offset
    elif spacing == "trailing":
        ratio = num_train / num_steps
        steps = np.round(np.arange(num_train, 0, -ratio)) - 1
    elif spacing == "linspace":
        steps = np.linspace(0, num_train - 1, num_steps).round()[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    return torch.from_numpy(steps.astype(np.int64).copy())
