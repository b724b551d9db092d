"""The cycle-consistency term of text-to-image training: a frozen captioner reads the caption back from what the
denoiser makes of it, and its loss joins the denoising loss (text -> image -> text).

:class:`CycleLoss` holds the frozen captioner and the term's options (:class:`~.options.CycleConfig`); the
:class:`~.modules.DiffusionModule` calls it on the rows it chose. Its randomness comes from the generator it is
handed, keyed to the step like everything else in training, so resume and DDP stay exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..data.shapes import binding_words, negative_caption
from ..diffusion import NoiseProcess
from ..diffusion.base import mean_flat, randn
from ..models import TextEncoderOutput
from ..pipelines.caption import CaptionPipeline
from .options import CycleConfig

BINDING = binding_words()
CYCLE_STREAM = 1  # the cycle term draws from its own step-keyed stream: the plain step's numbers never move


class CycleLoss:
    """``weight`` x the frozen captioner's loss on the model's estimate of the clean image (see
    :class:`~.options.CycleConfig` for the two modes). The captioner is frozen, shared and never copied (EMA
    copies of the module share it), and stays out of the optimiser, the checkpoint and the export."""

    def __init__(self, config: CycleConfig, captioner: CaptionPipeline, noise_process: NoiseProcess) -> None:
        self.config = config
        self.captioner = captioner
        self.noise_process = noise_process
        self.t_max = noise_process.low_noise_bound(config.t_max)
        captioner.captioner.eval().requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> CycleLoss:
        return self

    def due(self, step: int, accumulate: int = 1) -> bool:
        """Whether micro-batch ``step`` belongs to an optimiser step that carries the term."""
        return (step // accumulate) % self.config.every == 0

    def loss(self, module: Any, x0: torch.Tensor, captions: list[str], g: torch.Generator) -> torch.Tensor:
        """The captioner's loss on the estimate of some rows of this batch, for ``module`` (a DiffusionModule).

        Rows, times and noise are drawn for the global batch from ``g`` and sliced to this rank, and the
        per-caption losses are summed and divided by the global number of cycle rows, so that ranks
        averaging their gradients reproduce one process's mean.
        """
        if self.config.mode == "grpo":
            return self.grpo_loss(module, x0, captions, g)
        local, world = len(captions), module.world_size()
        total = local * world
        count = max(1, round(self.config.fraction * total))
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.randperm(total, generator=g, device=g.device)[:count].cpu()] = True
        last_k = self.config.mode == "last-k"
        t = None if last_k else self.low_noise_timesteps(total, g).to(module.device)[module.rank_rows(local)]
        noise = module.draw_normal(g, x0.shape)
        index = chosen[module.rank_rows(local)].nonzero().squeeze(1).to(module.device)
        if index.numel() == 0:  # this rank drew no cycle rows this step
            return x0.new_zeros(())
        texts = [captions[i] for i in index.tolist()]
        text = module.text_encoder(module.tokenizer(texts).input_ids.to(module.device))
        if last_k:
            x0_hat = self.draw_last_k(module, noise[index], text)
        else:
            process, x0, t = module.noise_process, x0[index], t[index]
            x_t = process.add_noise(x0, noise[index], t)
            prediction = module.denoiser(x_t, process.model_time(t), text.hidden_states, text.pooled, text.mask)
            x0_hat, _ = process.to_x0_eps(prediction.float(), x_t, t)
        pixels = x0_hat if module.vae is None else module.vae.decode_latents(x0_hat)
        per_caption = self.objective(pixels.to(self.captioner.device), texts).to(x0.device)
        return per_caption.sum() * world / count

    def objective(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The (B,) per-caption term: the captioner's cross-entropy (``ce``), the same with the binding words
        weighted (``weighted``), or cross-entropy plus ``softplus(nll(true) - nll(negative))`` for each negative
        caption: the colours swapped, and with ``negatives="colours+relation"`` a relation caption's opposite
        relation (``contrastive``; rows outside the shapes grammar keep plain CE)."""
        kind = self.config.objective
        if kind == "weighted":
            return self.captioner.loss(pixels, texts, reduction="none", word_weights=(BINDING, self.config.word_weight))
        nll = self.captioner.loss(pixels, texts, reduction="none")
        if kind == "ce":
            return nll
        total = nll
        for swap in self.config.negatives.split("+"):
            negatives = [negative_caption(text, swap) for text in texts]
            rows = [i for i, n in enumerate(negatives) if n is not None]
            if not rows:
                continue
            index = torch.tensor(rows, device=pixels.device)
            negative_nll = self.captioner.loss(pixels[index], [negatives[i] for i in rows], reduction="none")
            total = total.index_add(0, index, F.softplus(nll[index] - negative_nll))
        return total

    def draw_last_k(self, module: Any, noise: torch.Tensor, text: TextEncoderOutput) -> torch.Tensor:
        """Sample from ``noise`` under ``text``: the term's sampler steps, gradient through the last ``k``; with
        ``guidance`` other than 1, classifier-free guided as the pipeline samples (the empty caption unconditional)."""
        process, k = module.noise_process, self.config.k
        grid = process.grid(self.config.sample_steps)
        head, tail = grid[:-k], grid[-k:]
        model_fn = self.guided(module, text, noise.shape[0])
        with torch.no_grad():
            x = process.denoise(model_fn, noise, head)
        return process.denoise(model_fn, x, tail)

    def guided(self, module: Any, text: TextEncoderOutput, rows: int) -> Callable[..., torch.Tensor]:
        """The denoiser under ``text``, classifier-free guided by the term's ``guidance`` as the pipeline samples
        (the empty caption unconditional; no second call at guidance 1)."""
        scale, empty = self.config.guidance, None
        if scale != 1.0:
            empty = module.text_encoder(module.tokenizer([""] * rows).input_ids.to(module.device))

        def model_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            cond = module.denoiser(x, s, text.hidden_states, text.pooled, text.mask).float()
            if empty is None:
                return cond
            uncond = module.denoiser(x, s, empty.hidden_states, empty.pooled, empty.mask).float()
            return uncond + scale * (cond - uncond)

        return model_fn

    def grpo_loss(self, module: Any, x0: torch.Tensor, captions: list[str], g: torch.Generator) -> torch.Tensor:
        """The policy-gradient term of mode ``grpo`` (see :class:`~.options.CycleConfig`).

        Its value is the captioner's mean loss on the drawings (what the reward is minus); its gradient is the
        group-normalised policy gradient. Captions, start noise, step noise and the trained steps are drawn for
        the global batch from ``g``; a caption's whole group is drawn on the rank that holds it, so ranks
        averaging their gradients reproduce one process's.
        """
        config, process = self.config, module.noise_process
        local, world = len(captions), module.world_size()
        total, group = local * world, config.group
        prompts = min(total, max(1, round(config.fraction * total / group)))
        chosen = torch.randperm(total, generator=g, device=g.device)[:prompts].tolist()
        grid = process.grid(config.sample_steps)
        scalar = torch.zeros(1)
        sigmas = [float(process.ddim_sigma(t, p, config.eta, scalar)) for t, p in grid]
        random_steps = [i for i, sigma in enumerate(sigmas) if sigma > 0]
        order = torch.randperm(len(random_steps), generator=g, device=g.device)[: config.k].tolist()
        trained = sorted(random_steps[i] for i in order)
        count = prompts * group
        start = randn((count, *x0.shape[1:]), g, module.device)
        step_noise = randn((len(grid), count, *x0.shape[1:]), g, module.device)
        rows = module.rank_rows(local)
        mine = [j for j, p in enumerate(chosen) if rows.start <= p < rows.stop]
        if not mine:  # this rank holds none of the drawn captions this step
            return x0.new_zeros(())
        index = torch.tensor([j * group + m for j in mine for m in range(group)], device=module.device)
        texts = [captions[chosen[j] - rows.start] for j in mine for _ in range(group)]
        text = module.text_encoder(module.tokenizer(texts).input_ids.to(module.device))
        model_fn = self.guided(module, text, len(texts))
        with torch.no_grad():
            path = [start[index]]
            for i, (t, t_prev) in enumerate(grid):
                prediction = model_fn(path[-1], process.model_time_of(t, path[-1]))
                path.append(process.step(prediction, path[-1], t, t_prev, config.eta, noise=step_noise[i][index]))
            drawn = path[-1] if module.vae is None else module.vae.decode_latents(path[-1])
            caption_loss = self.objective(drawn.to(self.captioner.device), texts).to(x0.device).float()
            rewards = -caption_loss.view(-1, group)
            advantage = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
        log_prob = x0.new_zeros(len(texts), dtype=torch.float32)
        for i in trained:
            t, t_prev = grid[i]
            x_t, x_next = path[i], path[i + 1]
            mean, _ = process.step_mean(model_fn(x_t, process.model_time_of(t, x_t)), x_t, t, t_prev, config.eta)
            # log p(x_next | x_t) times sigma: its gradient is eps . grad(mean), the noise in its own units, so
            # the steps near the clean end (sigma -> 0) do not drown the others in variance
            log_prob = log_prob - mean_flat((x_next - mean.float()) ** 2) / (2 * sigmas[i])
        surrogate = -(advantage * log_prob) / len(trained)
        per_row = caption_loss + surrogate - surrogate.detach()
        return per_row.sum() * world / count

    def low_noise_timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` times uniform below the term's ``t_max``, in the noise process's units (on ``g``'s device)."""
        return self.noise_process.times_below(n, self.t_max, g)
