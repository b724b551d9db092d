"""The cycle-consistency term of text-to-image training: a frozen captioner reads the caption back from what the
denoiser makes of it, and its loss joins the denoising loss (text -> image -> text).

:class:`CycleLoss` holds the frozen captioner and the term's options (:class:`~.options.CycleConfig`); the
:class:`~.modules.DiffusionModule` calls it on the rows it chose. Its randomness comes from the generator it is
handed, keyed to the step like everything else in training, so resume and DDP stay exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data.shapes import binding_words, negative_caption
from ..diffusion import NoiseProcess
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
        weighted (``weighted``), or cross-entropy plus ``softplus(nll(true) - nll(negative))`` where the
        negative caption swaps the colours (``contrastive``; rows outside the shapes grammar keep plain CE)."""
        kind = self.config.objective
        if kind == "weighted":
            return self.captioner.loss(pixels, texts, reduction="none", word_weights=(BINDING, self.config.word_weight))
        nll = self.captioner.loss(pixels, texts, reduction="none")
        if kind == "ce":
            return nll
        negatives = [negative_caption(text) for text in texts]
        rows = [i for i, n in enumerate(negatives) if n is not None]
        if not rows:
            return nll
        index = torch.tensor(rows, device=pixels.device)
        negative_nll = self.captioner.loss(pixels[index], [negatives[i] for i in rows], reduction="none")
        return nll.index_add(0, index, F.softplus(nll[index] - negative_nll))

    def draw_last_k(self, module: Any, noise: torch.Tensor, text: TextEncoderOutput) -> torch.Tensor:
        """Sample from ``noise`` under ``text``: the term's sampler steps, gradient through the last ``k``; with
        ``guidance`` other than 1, classifier-free guided as the pipeline samples (the empty caption unconditional)."""
        process, k, scale = module.noise_process, self.config.k, self.config.guidance
        grid = process.grid(self.config.sample_steps)
        head, tail = grid[:-k], grid[-k:]
        empty = None
        if scale != 1.0:
            empty = module.text_encoder(module.tokenizer([""] * noise.shape[0]).input_ids.to(module.device))

        def model_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            cond = module.denoiser(x, s, text.hidden_states, text.pooled, text.mask).float()
            if empty is None:
                return cond
            uncond = module.denoiser(x, s, empty.hidden_states, empty.pooled, empty.mask).float()
            return uncond + scale * (cond - uncond)

        with torch.no_grad():
            x = process.denoise(model_fn, noise, head)
        return process.denoise(model_fn, x, tail)

    def low_noise_timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` times uniform below the term's ``t_max``, in the noise process's units (on ``g``'s device)."""
        return self.noise_process.times_below(n, self.t_max, g)
