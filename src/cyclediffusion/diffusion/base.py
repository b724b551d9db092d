"""What every noise process shares: the model-function type, the loss record and seeded noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(x_t, model_time) -> prediction``; ``model_time`` is a (B,) float tensor in 0..1000.

Pipelines build it around a network (text conditioning, classifier-free guidance); the noise
process never sees the network itself.
"""

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``callback(step_index, timestep, latents)``, called after each sampler step (diffusers' order)."""

Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class TrainingLoss:
    """Per-sample training loss and the noise level each sample was drawn at.

    ``loss`` is (B,), already weighted; ``level`` is (B,) in [0, 1] (0 = clean), for logging the
    loss per noise-level bin.
    """

    loss: torch.Tensor
    level: torch.Tensor


class NoiseProcessBase:
    """The training loss every noise process shares; subclasses define the path and its target.

    A subclass provides ``sample_timesteps``, ``add_noise``, ``target``, ``model_time`` and
    ``noise_level``, and may weight the per-sample loss with ``loss_weight``.
    """

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights, or None for uniform weighting."""
        return None

    def training_loss(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TrainingLoss:
        """Noise ``x0`` at random times and regress the process's target (per-sample MSE, weighted)."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        prediction = model_fn(self.add_noise(x0, noise, t), self.model_time(t))
        loss = mean_flat((prediction.float() - self.target(x0, noise, t).float()) ** 2)
        weight = self.loss_weight(t)
        if weight is not None:
            loss = loss * weight
        return TrainingLoss(loss=loss, level=self.noise_level(t))


def randn(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise; a list of generators draws one batch row from each.

    Noise is drawn on the generator's device (CPU by default) and moved, so a seed gives the
    same picture on every device.
    """
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        out = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        return out.to(device) if device is not None else out
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    out = torch.cat([r.to(device) if device is not None else r for r in rows])
    return out


def expand_time(t: torch.Tensor | float | int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or (B,) time as a (B,) tensor."""
    t = torch.as_tensor(t, device=device, dtype=dtype)
    return t.expand(batch) if t.ndim == 0 else t


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(dim=1)


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values as (B, 1, ..., 1), float32 at least, on ``like``'s device."""
    values = values.to(device=like.device)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    return values.reshape(-1, *([1] * (like.ndim - 1)))
