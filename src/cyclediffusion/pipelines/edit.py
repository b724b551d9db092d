"""The edit core: one loop for the CycleDiffusion family, which differ only in how the source branch is drawn.

Each step moves a *source* branch, which stays on the image, and a *target* branch, which follows the target
prompt (or model), through ``target_next = mu_tgt + (source_next - mu_src)``: the target takes its own DDIM step
with the noise that the source branch needed to land on ``source_next``
(:meth:`~cyclediffusion.diffusion.base.NoiseProcessBase.coupled_step`). The methods:

- ``cycle`` (CycleDiffusion, the DPM-Encoder): the source branch is a chain that samples the exact posterior
  ``q(x_p | x_t, x0)`` at each step (eta > 0).
- ``ef_ddpm`` (edit-friendly DDPM inversion, Huberman-Spiegelglas et al. 2024): the source branch is an
  independent noising of the image at every step, so its noises carry the image more strongly.
- ``ddim_inversion``: invert the image with the deterministic chain of the source prompt, then run that chain
  forward under the target prompt (no source branch during the edit).
- ``sdedit``: noise the image to ``strength`` and denoise under the target prompt.
- ``flowedit`` (Kulikov et al. 2024, flow models only): no inversion; the edit ``z`` starts at the image and moves
  by the difference of the target's and the source's velocities at ``z_tgt = z + z_src - x0`` and ``z_src``, a
  fresh noising of the image.

Every method but ``sdedit`` returns the input exactly when the target prompt, model and guidance equal the
source's. A ``mask_image`` (white = edit) blends the target branch into the source branch at every step outside
the mask and pastes the source pixels there at the end, so everything outside stays the source's;
``mask_image="auto"`` reads the mask from the model (:mod:`~cyclediffusion.pipelines.implicit_mask`). With a
mask, ``resample=r`` takes every step but the last ``1 + r`` times (RePaint, Lugmayr et al. 2022): the blended
branches are noised back up to the step's start with one shared noise and the step is taken again, so that what
the target drew outside the mask, and the blend erased, is drawn again inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import weights_digest
from ..diffusion.base import Generator, StepCallback, randn
from ..diffusion.flow import FlowMatching
from ..images import ImageInput, images_to_tensor
from .base import DiffusionPipeline, Guidance, ImagePipelineOutput, as_list, broadcast_list, every, expand_rows
from .coupling import AttentionCoupling, CouplingProcessor, coupled, token_map
from .implicit_mask import THRESHOLD, check_threshold, implicit_mask

METHODS = ("cycle", "ef_ddpm", "ddim_inversion", "sdedit", "flowedit")
FLOW_METHODS = ("flowedit",)  # flow-matching models only
GENERAL_METHODS = tuple(m for m in METHODS if m not in FLOW_METHODS)  # for every model
MASKED_METHODS = ("cycle", "ef_ddpm", "sdedit", "flowedit")  # those with a source branch to blend into
RESAMPLED_METHODS = ("cycle", "ef_ddpm", "sdedit")  # those whose branches are noisy points to noise back up
COUPLED_METHODS = ("cycle", "ef_ddpm", "ddim_inversion", "flowedit")  # a source branch beside the target
MaskInput = Image.Image | np.ndarray | torch.Tensor | Sequence[Image.Image] | str  # str: "auto"


def edit(
    source: DiffusionPipeline,
    target: DiffusionPipeline,
    prompt: str | Sequence[str],
    source_prompt: str | Sequence[str],
    image: ImageInput | None,
    strength: float = 0.8,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    source_guidance_scale: float = 1.0,
    eta: float = 0.1,
    num_images_per_prompt: int = 1,
    generator: Generator = None,
    output_type: str = "pil",
    callback: StepCallback | None = None,
    callback_steps: int = 1,
    method: str = "cycle",
    mask_image: MaskInput | None = None,
    coupling: AttentionCoupling | None = None,
    resample: int = 0,
    mask_threshold: float = THRESHOLD,
) -> ImagePipelineOutput:
    """Encode ``image`` with the ``source`` pipeline and decode it with the ``target`` pipeline (the same object
    for an edit, two models for a translation); see :class:`~.cycle.CycleDiffusionPipeline` for the arguments.
    The output's ``nfe`` is the number of denoiser evaluations per edited image."""
    check_arguments(source, method, eta, strength, num_inference_steps, num_images_per_prompt, mask_image)
    check_resample(resample, method, mask_image)
    check_threshold(mask_threshold)
    if mask_threshold != THRESHOLD and not isinstance(mask_image, str):
        raise ValueError("mask_threshold cuts the mask read from the model: give mask_image='auto' too")
    if coupling is not None:
        if not isinstance(coupling, AttentionCoupling):
            raise TypeError(f"coupling must be an AttentionCoupling, got {type(coupling).__name__}")
        if method not in COUPLED_METHODS:
            raise ValueError(f"method {method!r} has no source branch to couple attention with; use one of "
                             f"{', '.join(COUPLED_METHODS)}")  # fmt: skip
        if source is not target:
            raise ValueError("attention coupling needs one model for both branches (an edit, not a translation)")
    prompts = as_list(prompt, "prompt")
    sources = broadcast_list(as_list(source_prompt, "source_prompt"), len(prompts), "source prompts")
    if source is not target:
        check_same_space(source, target)
    x0 = source.image_latents(image, len(prompts), num_images_per_prompt, generator)
    auto_mask = isinstance(mask_image, str)
    if auto_mask and mask_image != "auto":
        raise ValueError(f"mask_image must be an image, a list of images or 'auto', got {mask_image!r}")
    mask = None
    if mask_image is not None and not auto_mask:
        mask = pixel_mask(mask_image, image, len(prompts), num_images_per_prompt).to(x0.device)
    process = source.noise_process
    grid = process.grid(num_inference_steps)
    run = min(int(num_inference_steps * strength), num_inference_steps)
    grid = grid[num_inference_steps - run :]
    if not grid:  # strength too low for a single step: nothing changes
        return target.postprocess(x0, output_type)

    tgt = target.prompt_guidance(prompts, guidance_scale, num_images_per_prompt)
    src = source.prompt_guidance(sources, source_guidance_scale, num_images_per_prompt)
    latent_mask = None if mask is None else F.adaptive_max_pool2d(mask, x0.shape[-2:])
    branches = Branches(source, target, src, tgt, x0, grid, eta, generator, every(callback, callback_steps), resample)
    with count_rows(source, target) as rows:
        if auto_mask:  # read from the model: where the two prompts' estimates part (counted in nfe)
            latent_mask = implicit_mask(source, target, x0, src, tgt, generator, threshold=mask_threshold)
            mask = F.interpolate(latent_mask, scale_factor=source.latent_factor, mode="nearest")
        with branches.coupling(coupling, sources, prompts, num_images_per_prompt):
            x = getattr(branches, method)(latent_mask)
    out = target.postprocess(x, output_type)
    if mask is not None and output_type != "latent":
        out = paste_outside(out, image, mask, source.latent_factor, output_type)
    out.nfe = rows[0] / x0.shape[0]
    return out


def check_resample(resample: int, method: str, mask_image: MaskInput | None) -> None:
    """``resample`` is a count of extra passes, for a masked edit of a method with noisy branches."""
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 0:
        raise ValueError(f"resample must be a whole number >= 0, got {resample!r}")
    if resample and mask_image is None:
        raise ValueError("resample harmonises a masked edit: give mask_image too")
    if resample and method not in RESAMPLED_METHODS:
        raise ValueError(f"method {method!r} cannot resample (its edit is not a noisy point to noise back up); use "
                         f"one of {', '.join(RESAMPLED_METHODS)}")  # fmt: skip


def check_arguments(
    source: DiffusionPipeline,
    method: str,
    eta: float,
    strength: float,
    steps: int,
    per_prompt: int,
    mask_image: MaskInput | None,
) -> None:
    """One clear ``ValueError`` for each bad argument."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in ("cycle", "ef_ddpm") and eta <= 0:
        raise ValueError(f"eta={eta}: {method} needs eta > 0 (its code is the noise of a stochastic chain)")
    if method in FLOW_METHODS and not isinstance(source.noise_process, FlowMatching):
        raise ValueError("method 'flowedit' needs a flow-matching model (inversion-free editing along its velocities)")
    if mask_image is not None and method not in MASKED_METHODS:
        raise ValueError(f"method {method!r} has no source branch to keep outside a mask; use one of "
                         f"{', '.join(MASKED_METHODS)}")  # fmt: skip
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if steps < 1 or per_prompt < 1:
        raise ValueError("num_inference_steps and num_images_per_prompt must be at least 1")


class Branches:
    """The source and target branches of one edit; one method per way of drawing the source branch."""

    def __init__(
        self,
        source: DiffusionPipeline,
        target: DiffusionPipeline,
        src: Guidance,
        tgt: Guidance,
        x0: torch.Tensor,
        grid: list[tuple[float, float]],
        eta: float,
        generator: Generator,
        callback: StepCallback | None,
        resample: int = 0,
    ) -> None:
        self.source, self.target, self.src, self.tgt = source, target, src, tgt
        self.x0, self.grid, self.eta, self.generator, self.callback = x0, grid, eta, generator, callback
        self.process = source.noise_process
        self.paired = paired_predictions(source, target, src, tgt)
        self.processor: CouplingProcessor | None = None
        self.shares = (0.0, 0.0)
        self.resample = resample  # extra passes of every masked step but the last (RePaint)

    @contextmanager
    def coupling(
        self, coupling: AttentionCoupling | None, sources: list[str], prompts: list[str], per_prompt: int
    ) -> Iterator[None]:
        """Couple the branches' attention inside the block (nothing without ``coupling``)."""
        if coupling is None:
            yield
            return
        tokenizer = self.source.tokenizer
        pairs = zip(tokenizer(sources).input_ids.tolist(), tokenizer(prompts).input_ids.tolist())
        maps = torch.stack([token_map(a, b) for a, b in pairs]).repeat_interleave(per_prompt, dim=0)
        n = self.x0.shape[0]
        src_parts = 2 if self.src.guided else 1
        src_cond = (1 if self.src.guided else 0) * n
        tgt_cond = src_parts * n + (n if self.tgt.guided else 0)
        self.processor = CouplingProcessor(maps)
        self.processor.source_rows = torch.arange(src_cond, src_cond + n, device=self.x0.device)
        self.processor.target_rows = torch.arange(tgt_cond, tgt_cond + n, device=self.x0.device)
        self.shares = (coupling.cross_steps, coupling.self_steps)
        with coupled(self.source.denoiser, self.processor):
            yield

    def predict(self, i: int, x_src: torch.Tensor, x_tgt: torch.Tensor, t: torch.Tensor):
        """Both branches' predictions at step ``i`` (coupled for the configured shares of the steps)."""
        if self.processor is not None:
            steps = len(self.grid)
            self.processor.cross = i < self.shares[0] * steps
            self.processor.self_ = i < self.shares[1] * steps
        return self.paired(x_src, x_tgt, t)

    def report(self, i: int, t: float, x: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(i, self.process.model_time_of(t, x)[0], x)

    def passes(self, i: int, mask: torch.Tensor | None) -> int:
        """How many times step ``i`` is taken: once, or ``1 + resample`` for a masked step before the last."""
        return 1 + (self.resample if mask is not None and i < len(self.grid) - 1 else 0)

    def renoised(self, t_prev: float, t: float, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The branches at ``t_prev`` noised back up to ``t`` with one shared noise (equal branches stay equal)."""
        noise = randn(xs[0].shape, self.generator, xs[0].device)
        return tuple(self.process.renoise(x, t_prev, t, noise) for x in xs)

    def noised(self, t: float) -> torch.Tensor:
        """An independent noising of the image at path time ``t``."""
        return self.process.add_noise(self.x0, randn(self.x0.shape, self.generator, self.x0.device), t)

    def coupled(self, source_next: Callable[[int, torch.Tensor], torch.Tensor], mask: torch.Tensor | None):
        """The shared loop of ``cycle`` and ``ef_ddpm``: ``source_next(i, x_src)`` draws the source branch's next
        point (the image itself at the last step)."""
        process, last = self.process, len(self.grid) - 1
        x_src = x_tgt = self.noised(self.grid[0][0])
        for i, (t, t_prev) in enumerate(self.grid):
            for again in range(self.passes(i, mask)):
                if again:
                    x_src, x_tgt = self.renoised(t_prev, t, x_src, x_tgt)
                src_prediction, tgt_prediction = self.predict(i, x_src, x_tgt, process.model_time_of(t, x_src))
                x_src_prev = self.x0 if i == last else source_next(i, x_src)
                x_tgt = process.coupled_step(
                    x_src, src_prediction, x_src_prev, x_tgt, tgt_prediction, t, t_prev, self.eta,
                    target_process=self.target.noise_process,
                )  # fmt: skip
                x_src = x_src_prev
                if mask is not None:
                    x_tgt = torch.lerp(x_src, x_tgt, mask)
            self.report(i, t, x_tgt)
        return x_tgt

    def cycle(self, mask: torch.Tensor | None) -> torch.Tensor:
        grid = self.grid

        def posterior(i: int, x_src: torch.Tensor) -> torch.Tensor:
            t, t_prev = grid[i]
            return self.process.dpm_encode_step(x_src, self.x0, t, t_prev, self.eta, self.generator)

        return self.coupled(posterior, mask)

    def ef_ddpm(self, mask: torch.Tensor | None) -> torch.Tensor:
        return self.coupled(lambda i, x_src: self.noised(self.grid[i][1]), mask)

    def ddim_inversion(self, mask: torch.Tensor | None) -> torch.Tensor:
        model_fn = lambda x, t: self.source.guided_predictions([x], t, [self.src])[0]  # noqa: E731
        x = self.process.invert(model_fn, self.x0, self.grid)
        if self.processor is None:
            target_fn = lambda x, t: self.target.guided_predictions([x], t, [self.tgt])[0]  # noqa: E731
            return self.target.noise_process.denoise(target_fn, x, self.grid, 0.0, callback=self.callback)
        x_src = x_tgt = x  # coupled: the source prompt's chain runs beside the target's
        for i, (t, t_prev) in enumerate(self.grid):
            src_prediction, tgt_prediction = self.predict(i, x_src, x_tgt, self.process.model_time_of(t, x))
            x_src = self.process.step(src_prediction, x_src, t, t_prev)
            x_tgt = self.target.noise_process.step(tgt_prediction, x_tgt, t, t_prev)
            self.report(i, t, x_tgt)
        return x_tgt

    def sdedit(self, mask: torch.Tensor | None) -> torch.Tensor:
        target_fn = lambda x, t: self.target.guided_predictions([x], t, [self.tgt])[0]  # noqa: E731
        process, last = self.target.noise_process, len(self.grid) - 1
        x = self.noised(self.grid[0][0])
        for i, (t, t_prev) in enumerate(self.grid):
            for again in range(self.passes(i, mask)):
                if again:
                    (x,) = self.renoised(t_prev, t, x)
                x = process.step(target_fn(x, process.model_time_of(t, x)), x, t, t_prev, self.eta, self.generator)
                if mask is not None:
                    x = torch.lerp(self.x0 if i == last else self.noised(t_prev), x, mask)
            self.report(i, t, x)
        return x

    def flowedit(self, mask: torch.Tensor | None) -> torch.Tensor:
        process, target = self.process, self.target.noise_process
        z = self.x0
        for i, (t, t_prev) in enumerate(self.grid):
            z_src = self.noised(t)
            z_tgt = z + z_src - self.x0
            src_prediction, tgt_prediction = self.predict(i, z_src, z_tgt, process.model_time_of(t, z))
            v_src = velocity(process, src_prediction, z_src, t)
            v_tgt = velocity(target, tgt_prediction, z_tgt, t)
            z = (z + (t_prev - t) * (v_tgt - v_src)).to(self.x0.dtype)
            if mask is not None:
                z = torch.lerp(self.x0, z, mask)
            self.report(i, t, z)
        return z


def check_same_space(source: DiffusionPipeline, target: DiffusionPipeline) -> None:
    """Two-model translation needs one latent space (the same VAE) and one noise path (the same schedule)."""
    if (source.vae is None) != (target.vae is None) or (
        source.vae is not None and weights_digest(source.vae) != weights_digest(target.vae)
    ):
        raise ValueError("the source and target models must share their VAE (one latent space) to translate")
    a, b = source.noise_process, target.noise_process
    if type(a) is not type(b) or a.grid(10) != b.grid(10) or not _same_path(a, b):
        raise ValueError("the source and target models must use the same noise schedule to translate")


def _same_path(a, b) -> bool:
    like = torch.zeros(1)
    return all(
        torch.allclose(x, y) for t, _ in a.grid(50) for x, y in zip(a.alpha_sigma(t, like), b.alpha_sigma(t, like))
    )


def velocity(process: Any, prediction: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """The flow path's velocity ``eps - x0`` of a prediction (any prediction type the process knows)."""
    x0, eps = process.to_x0_eps(prediction, x_t, t)
    return eps - x0


def paired_predictions(
    source: DiffusionPipeline, target: DiffusionPipeline, src: Guidance, tgt: Guidance
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(x_src, x_tgt, t) -> (source prediction, target prediction)``: one batched call for one model."""
    if source is target:
        return lambda x_src, x_tgt, t: tuple(source.guided_predictions([x_src, x_tgt], t, [src, tgt]))
    return lambda x_src, x_tgt, t: (
        source.guided_predictions([x_src], t, [src])[0],
        target.guided_predictions([x_tgt], t, [tgt])[0],
    )


@contextmanager
def count_rows(*pipes: DiffusionPipeline):
    """Count the rows every denoiser of ``pipes`` evaluates inside the block (``rows[0]``)."""
    rows = [0]

    def hook(module: torch.nn.Module, args: tuple) -> None:
        rows[0] += args[0].shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in {id(p.denoiser): p.denoiser for p in pipes}.values()]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


def pixel_mask(mask_image: MaskInput, image: ImageInput, num_prompts: int, per_prompt: int) -> torch.Tensor:
    """The edit mask as (B, 1, H, W) floats in {0, 1} (1 = edit), one row per output image, checked against the
    image: one channel, binary, the image's size."""
    items = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    masks = []
    for item in items:
        if isinstance(item, Image.Image):
            if item.mode not in ("1", "L"):
                raise ValueError(f"mask_image must be a single-channel image (mode L or 1), got mode {item.mode}")
            array = np.asarray(item.convert("L"), dtype=np.float32) / 255.0
        else:
            array = item.detach().cpu().float().numpy() if isinstance(item, torch.Tensor) else np.asarray(item, float)
            array = array[0] if array.ndim == 3 and array.shape[0] == 1 else array
            if array.ndim != 2:
                raise ValueError(f"mask_image must be one channel (H, W), got shape {tuple(np.shape(item))}")
            array = array / 255.0 if array.max() > 1 else array
        if not np.isin(array, (0.0, 1.0)).all():
            raise ValueError("mask_image must be binary: black (keep) and white (edit) only")
        masks.append(torch.from_numpy(array.astype(np.float32))[None, None])
    mask = torch.cat(masks)
    size = reference_size(image)
    if size is not None and tuple(mask.shape[-2:]) != size:
        raise ValueError(f"mask_image is {mask.shape[-1]}x{mask.shape[-2]} but the image is {size[1]}x{size[0]}")
    if mask.shape[0] not in (1, num_prompts):
        raise ValueError(f"got {mask.shape[0]} masks for {num_prompts} prompts: give one, or one per prompt")
    return expand_rows(mask.expand(num_prompts, -1, -1, -1), num_prompts, per_prompt)


def reference_size(image: ImageInput) -> tuple[int, int] | None:
    """(H, W) of the input image(s) in pixels; None for latents."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, Image.Image):
        return first.size[1], first.size[0]
    if isinstance(first, np.ndarray):
        return tuple(first.shape[-3:-1]) if first.shape[-1] in (1, 3) else None
    if isinstance(first, torch.Tensor) and first.shape[-3] == 3:
        return tuple(first.shape[-2:])
    return None


def paste_outside(
    out: ImagePipelineOutput, image: ImageInput, mask: torch.Tensor, multiple: int, output_type: str
) -> ImagePipelineOutput:
    """The source pixels outside ``mask`` over the decoded edit (for inputs given as pixels)."""
    if reference_size(image) is None:
        return out  # latents in: the latent blend is all there is
    pixels = (images_to_tensor(image, multiple) / 2 + 0.5).clamp(0, 1)
    edited = out.images
    tensor = edited if output_type == "pt" else torch.from_numpy(np.stack([np.asarray(i) for i in edited]))
    if output_type == "pil":
        tensor = tensor.float() / 255
    if output_type in ("pil", "np"):
        tensor = tensor.permute(0, 3, 1, 2)
    h, w = tensor.shape[-2:]
    rows = mask.shape[0]
    pixels = pixels[:, :, :h, :w]
    pixels = pixels.repeat_interleave(rows // pixels.shape[0], dim=0)  # prompt-major, as the outputs
    mask = mask[:, :, :h, :w].cpu()
    composite = torch.lerp(pixels, tensor.float().cpu(), mask)
    if output_type == "pt":
        return ImagePipelineOutput(composite)
    array = composite.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return ImagePipelineOutput(array)
    return ImagePipelineOutput([Image.fromarray((a * 255).round().astype(np.uint8)) for a in array])
