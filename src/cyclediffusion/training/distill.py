"""Few-step distillation: a student denoiser learns to take in one step what several guided steps of its teacher take.

Each training row draws one of the student's ``student_steps`` sampler steps ``(t, t_prev)`` (the noise process's
:meth:`~cyclediffusion.diffusion.base.NoiseProcessBase.grid`) and noises a training latent to ``t``. The frozen
teacher runs ``teacher_substeps`` deterministic DDIM steps (Euler steps for flow matching) from there to ``t_prev``,
guided as the teacher's own sampling guides them (:meth:`~.Text2ImagePipeline.sampling_model_fn`: classifier-free
guidance, and on request autoguidance by the guide its folder holds). The student, which starts as a copy of the
teacher's denoiser and sees only the caption, learns to land on the teacher's point in one step of the same
sampler: its x0 estimate is regressed on the x0 whose step makes that move
(:meth:`~cyclediffusion.diffusion.base.NoiseProcessBase.x0_through`), weighted by ``(alpha^2 + sigma^2) / sigma^2``
(progressive distillation's "SNR + 1" weight, Salimans & Ho 2022; distilling straight to the final number of steps,
as TRACT does, Berthelot et al. 2023). The guidance is baked in: the student samples at guidance 1, one network
call per step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..diffusion.base import ModelFn, TrainingLoss, broadcast, mean_flat
from ..pipelines import Text2ImagePipeline
from ..pipelines.base import PromptEmbeds
from .modules import DiffusionModule, OptimConfig, StepLosses
from .options import START_FROM


class DistillModule(DiffusionModule):
    """Trains a few-step student of ``teacher`` (a trained pipeline, left unchanged); the text encoder, tokenizer,
    VAE and noise process are the teacher's and stay frozen. ``guidance_scale`` is the teacher's classifier-free
    guidance (default: its own) and ``guide_scale`` the weight of its autoguidance model (default 0: none; None:
    the teacher's own weight, as it samples by default); the exported student samples with guidance 1 in
    ``student_steps`` steps by default."""

    def __init__(
        self,
        teacher: Text2ImagePipeline,
        optim: OptimConfig,
        student_steps: int = 4,
        teacher_substeps: int = 4,
        guidance_scale: float | None = None,
        seed: int = 0,
        start_from: str = "data",
        guide_scale: float | None = 0.0,
    ) -> None:
        if start_from not in START_FROM:
            raise ValueError(f"start_from must be one of {', '.join(START_FROM)}, got {start_from!r}")
        if guide_scale and teacher.guide is None:
            raise ValueError("--guide-scale needs a teacher that carries an autoguidance model (guide/ in its folder)")
        paths = teacher.noise_process.nested_grid(student_steps, teacher_substeps)
        student = copy.deepcopy(teacher.denoiser).train().requires_grad_(True)
        teacher.denoiser.eval().requires_grad_(False)
        super().__init__(
            teacher.tokenizer, teacher.text_encoder, student, teacher.noise_process, teacher.vae, optim,
            caption_dropout=0.0, train_text_encoder=False, seed=seed, guidance_scale=1.0,
        )  # fmt: skip
        self.text_encoder.train()  # frozen and without dropout, so the mode changes nothing but Lightning's warning
        self.student_steps, self.start_from = student_steps, start_from
        self.teacher_guidance, self.guide_scale = guidance_scale, guide_scale
        if teacher.guide is not None:
            for part in teacher.guide.eval().modules:
                part.requires_grad_(False)
        # (student_steps, teacher_substeps + 1): the times the teacher passes through across each student step
        self.paths = torch.tensor([[path[0][0]] + [t_prev for _, t_prev in path] for path in paths])
        self.shared.value["teacher"] = teacher

    @property
    def teacher(self) -> Text2ImagePipeline:
        return self.shared.value["teacher"]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.denoiser.to(self.device)
        if self.teacher.guide is not None:
            self.teacher.guide.to(self.device)

    def to_pipeline(self) -> Text2ImagePipeline:
        """The student as a pipeline that samples in ``student_steps`` steps without guidance by default."""
        pipe = super().to_pipeline()
        pipe.num_inference_steps = self.student_steps
        return pipe

    @torch.no_grad()
    def teacher_steps(self, x: torch.Tensor, path: torch.Tensor, model_fn: ModelFn) -> torch.Tensor:
        """Where the teacher's guided steps (``model_fn``) through the times of ``path`` (one row of times per
        sample) take ``x``."""
        process = self.noise_process
        for j in range(path.shape[1] - 1):
            t, t_prev = path[:, j], path[:, j + 1]
            stepped = process.step(model_fn(x, process.model_time(t)), x, t, t_prev)
            x = torch.where(broadcast(t == t_prev, x) > 0, x, stepped)  # a step too short to split stays put
        return x

    def student_pairs(
        self, x0: torch.Tensor, g: torch.Generator, cond: PromptEmbeds, model_fn: ModelFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, x_prev, path, rows)``: where student steps start, where the teacher's steps across them end, their
        times, and the batch row each pair's caption comes from.

        From ``data``: one step per row, drawn at random, starting at the row's latent noised to the step's time.
        From ``noise``: the teacher samples every row from pure noise along the whole grid, and each of its
        ``student_steps`` stretches is a pair (``student_steps`` pairs per row). From ``student``: one step per row,
        drawn at random, starting where the student's own earlier steps (without gradient) take the row's noised
        latent from the start of the grid."""
        local = x0.shape[0]
        paths = self.paths.to(self.device)
        if self.start_from == "noise":
            x = self.draw_normal(g, x0.shape)
            starts, ends = [], []
            for path in paths:
                starts.append(x)
                x = self.teacher_steps(x, path.expand(local, -1), model_fn)
                ends.append(x)
            rows = torch.arange(local, device=self.device).repeat(self.student_steps)
            return torch.cat(starts), torch.cat(ends), paths.repeat_interleave(local, dim=0), rows
        which = torch.randint(self.student_steps, (local * self.world_size(),), generator=g, device=self.device)
        which = which[self.rank_rows(local)]
        path = paths[which]
        if self.start_from == "student":
            x_t = self.student_steps_to(which, x0, self.draw_normal(g, x0.shape), cond)
        else:
            x_t = self.noise_process.add_noise(x0, self.draw_normal(g, x0.shape), path[:, 0])
        return x_t, self.teacher_steps(x_t, path, model_fn), path, torch.arange(local, device=self.device)

    @torch.no_grad()
    def student_steps_to(
        self, which: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, cond: PromptEmbeds
    ) -> torch.Tensor:
        """Each row's latent noised to the start of the grid, then moved by the student's own steps (its current
        weights, no gradient) up to the start of its step ``which``."""
        process, paths = self.noise_process, self.paths.to(self.device)
        x = process.add_noise(x0, noise, paths[0, 0].expand(x0.shape[0]))
        for j in range(int(which.max())):
            rows = (which > j).nonzero().flatten()
            t, t_prev = paths[j, 0].expand(len(rows)), paths[j, -1].expand(len(rows))
            prediction = self.student(x[rows], t, cond, rows)
            x[rows] = process.step(prediction.float(), x[rows], t, t_prev).to(x.dtype)
        return x

    def student(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds, rows: torch.Tensor) -> torch.Tensor:
        """The student's (unguided) prediction at ``x`` and times ``t`` for the captions of batch ``rows``."""
        pooled = cond.pooled[rows] if self.denoiser.takes_pooled else None
        mask = None if cond.mask is None else cond.mask[rows]
        return self.denoiser(x, self.noise_process.model_time(t), cond.context[rows], pooled, mask)

    def step_losses(self, batch: dict[str, Any]) -> StepLosses:
        """One distillation step; every random number is keyed to ``batch["step"]`` (exact resume and DDP)."""
        g = self.step_generator(int(batch["step"][0]))
        captions: list[str] = list(batch["caption"])
        x0 = self.clean_latents(batch, g)
        process = self.noise_process
        guidance, model_fn = self.teacher.sampling_model_fn(
            captions, self.teacher_guidance, guide_scale=self.guide_scale
        )
        x_t, x_prev, path, rows = self.student_pairs(x0, g, guidance.cond, model_fn)
        t = path[:, 0]
        target = process.x0_through(x_t, t, x_prev, path[:, -1])
        prediction = self.student(x_t, t, guidance.cond, rows)
        x0_hat, _ = process.to_x0_eps(prediction.float(), x_t, t)
        alpha, sigma = process.alpha_sigma(t, x_t)
        weight = ((alpha**2 + sigma**2) / sigma**2).flatten()
        loss = weight * mean_flat((x0_hat - target) ** 2)
        return StepLosses(loss.mean(), TrainingLoss(loss=loss, level=process.noise_level(t)))
