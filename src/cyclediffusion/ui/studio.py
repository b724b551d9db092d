"""What the web UI does, without the web: generate, edit and translate with checked input, and the model card.

:class:`Studio` holds the loaded models and turns the values of the page's fields into pipeline calls; every bad
value is an :class:`~cyclediffusion.ui.limits.InputError` with a message for the page. The Gradio app
(:mod:`cyclediffusion.ui.app`) is a thin layer over it, so everything here is testable without a server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..diffusion import FlowMatching
from ..diffusion import flow as flow_process
from ..diffusion import gaussian as gaussian_process
from ..pipelines import CycleDiffusionPipeline, Text2ImagePipeline, translate
from ..pipelines.base import DEFAULT_STEPS, pick_device
from ..pipelines.edit import GENERAL_METHODS, MASKED_METHODS, METHODS, RESAMPLED_METHODS
from ..pipelines.implicit_mask import THRESHOLD
from ..pipelines.storage import find_pipeline
from ..precision import cast_pipeline
from .limits import InputError, Limits, check_number, check_prompt

Progress = Callable[[int, int], None]  # (steps done, steps in all)

MAX_RESAMPLE = 4  # extra passes per masked step a page may ask for (each costs a whole edit's network calls)
MAX_MASK_THRESHOLD = 0.95  # the highest cut of the auto mask a page may ask for (1 would mark nothing)


@dataclass
class Generated:
    """Images of one generate request and the seed of each (``cyclediffusion sample --seed`` redraws it)."""

    images: list[Image.Image]
    seeds: list[int]


class Studio:
    """The models behind the UI: ``model`` (a run or model folder) and, for translation, ``target_model``."""

    def __init__(
        self,
        model: str | Path | Text2ImagePipeline,
        target_model: str | Path | Text2ImagePipeline | None = None,
        device: str = "auto",
        dtype: str = "auto",
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.model_dir = None if isinstance(model, Text2ImagePipeline) else find_pipeline(model)
        self.pipe = self._load(model, device, dtype)
        self.editor = CycleDiffusionPipeline(**self.pipe.components, guidance_scale=self.pipe.guidance_scale)
        self.target = None
        if target_model is not None:
            target = self._load(target_model, device, dtype)
            self.target = CycleDiffusionPipeline(**target.components, guidance_scale=target.guidance_scale)

    @staticmethod
    def _load(model: str | Path | Text2ImagePipeline, device: str, dtype: str) -> Text2ImagePipeline:
        if isinstance(model, Text2ImagePipeline):
            return model.eval()
        return cast_pipeline(Text2ImagePipeline.from_pretrained(model, device=pick_device(device)), dtype)

    # ----------------------------------------------------------------- what the page offers
    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers of the model's noise process, its default first."""
        flow = isinstance(self.pipe.noise_process, FlowMatching)
        return flow_process.SAMPLERS if flow else gaussian_process.SAMPLERS

    @property
    def methods(self) -> tuple[str, ...]:
        """Every edit method the model supports (``flowedit`` only for flow-matching models)."""
        return METHODS if isinstance(self.pipe.noise_process, FlowMatching) else GENERAL_METHODS

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels the model was trained at; edit inputs are resized to it."""
        _, _, h, w = self.pipe.latent_shape(1, None, None)
        factor = self.pipe.latent_factor
        return w * factor, h * factor

    # ----------------------------------------------------------------- the three actions
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: Any = None,
        guidance: Any = None,
        sampler: str | None = None,
        seed: Any = 0,
        num_images: Any = 1,
        progress: Progress | None = None,
        guide_scale: Any = None,
    ) -> Generated:
        """``num_images`` images of ``prompt``; image ``i`` uses seed ``seed + i``, as ``cyclediffusion sample``. A
        model that carries an autoguidance model uses it, with weight ``guide_scale`` (default: the model's; 0: off)."""
        tokenizer = self.pipe.tokenizer
        prompt = check_prompt(tokenizer, prompt)
        negative = check_prompt(tokenizer, negative_prompt, "negative prompt", required=False) or None
        steps = self.steps(steps, self.pipe.default_steps)
        n, seed = self.limits.images(num_images), whole_seed(seed)
        sampler = self.check_choice("sampler", sampler or self.samplers[0], self.samplers)
        seeds = [seed + i for i in range(n)]
        images = self.pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=self.guidance(guidance),
            num_images_per_prompt=n,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            sampler=sampler,
            callback=step_counter(progress, steps),
            guide_scale=None if guide_scale in (None, "") else check_number("guide scale", guide_scale, 0.0),
        ).images
        return Generated(images, seeds)

    def edit(
        self,
        image: Image.Image | None,
        source_prompt: str,
        prompt: str,
        method: str = "cycle",
        strength: Any = 0.8,
        eta: Any = 0.1,
        guidance: Any = None,
        source_guidance: Any = 1.0,
        steps: Any = None,
        seed: Any = 0,
        mask: Image.Image | str | None = None,
        progress: Progress | None = None,
        resample: Any = 0,
        mask_threshold: Any = THRESHOLD,
    ) -> Image.Image:
        """``image`` (shown by ``source_prompt``) edited to show ``prompt``; with ``mask`` (white = edit) only
        there (``"auto"``: where the model's estimates for the two prompts differ by more than ``mask_threshold``
        of their largest difference), each step taken ``1 + resample`` times (RePaint). Inputs are resized to the
        model's :attr:`image_size`."""
        method = self.check_choice("method", method, self.methods)
        return self._edit(self.editor, self.editor, image, source_prompt, prompt, method, strength, eta, guidance,
                          source_guidance, steps, seed, mask, progress, resample, mask_threshold)  # fmt: skip

    def translate(
        self,
        image: Image.Image | None,
        source_prompt: str = "",
        prompt: str = "",
        strength: Any = 0.8,
        eta: Any = 0.1,
        guidance: Any = None,
        steps: Any = None,
        seed: Any = 0,
        progress: Progress | None = None,
    ) -> Image.Image:
        """``image`` from the model's domain carried to the target model's (CycleDiffusion's two-model setting)."""
        if self.target is None:
            raise InputError("translation needs a second model: start the server with --target-model")
        return self._edit(self.editor, self.target, image, source_prompt, prompt or source_prompt, "cycle",
                          strength, eta, guidance, 1.0, steps, seed, None, progress)  # fmt: skip

    def _edit(
        self,
        source: CycleDiffusionPipeline,
        target: CycleDiffusionPipeline,
        image: Image.Image | None,
        source_prompt: str,
        prompt: str,
        method: str,
        strength: Any,
        eta: Any,
        guidance: Any,
        source_guidance: Any,
        steps: Any,
        seed: Any,
        mask: Image.Image | str | None,
        progress: Progress | None,
        resample: Any = 0,
        mask_threshold: Any = THRESHOLD,
    ) -> Image.Image:
        two_models = source is not target
        image = self.model_input(image)
        source_prompt = check_prompt(source.tokenizer, source_prompt, "source prompt", required=not two_models)
        prompt = check_prompt(target.tokenizer, prompt, "target prompt", required=not two_models)
        strength = check_number("strength", strength, 0.0, 1.0)
        eta = check_number("eta", eta, 0.0, 1.0)
        if method in ("cycle", "ef_ddpm") and eta == 0:
            raise InputError(f"eta must be above 0 for {method}: its code is the noise of a stochastic chain")
        steps = self.steps(steps)
        if mask is not None:
            if method not in MASKED_METHODS:
                raise InputError(
                    f"method {method} cannot keep what lies outside a mask; use {', '.join(MASKED_METHODS)}"
                )
            if not isinstance(mask, str):  # "auto": read from the model
                mask = mask.resize(self.image_size, Image.Resampling.NEAREST)
        resample = whole_number("resample passes", resample, 0, MAX_RESAMPLE)
        if resample and mask is None:
            raise InputError("resampling redraws a masked edit: paint where to edit, or tick the auto mask")
        if resample and method not in RESAMPLED_METHODS:
            raise InputError(f"method {method} cannot resample; use {', '.join(RESAMPLED_METHODS)}")
        options = dict(
            strength=strength,
            num_inference_steps=steps,
            source_guidance_scale=check_number("source guidance", source_guidance, 0.0),
            eta=eta,
            generator=torch.Generator().manual_seed(whole_seed(seed)),
            method=method,
            mask_image=mask,
            resample=resample,
            callback=step_counter(progress, max(1, int(steps * strength))),
        )
        if mask == "auto":  # a painted mask has no cut
            options["mask_threshold"] = check_number("auto mask cut", mask_threshold, 0.0, MAX_MASK_THRESHOLD, True)
        if guidance not in (None, ""):
            options["guidance_scale"] = check_number("guidance", guidance, 0.0)
        if two_models:
            return translate(image, source, target, source_prompt, prompt, **options).images[0]
        return source(prompt, source_prompt, image, **options).images[0]

    # ----------------------------------------------------------------- helpers
    def model_input(self, image: Image.Image | None) -> Image.Image:
        """An uploaded image, checked against the limits, as RGB at the model's :attr:`image_size` (what edits
        and translations start from)."""
        return self.limits.image(image).resize(self.image_size, Image.Resampling.BICUBIC)

    def steps(self, value: Any, default: int = DEFAULT_STEPS) -> int:
        """The steps asked for (default: ``default``, the pipeline's own, within the limit)."""
        return self.limits.steps(min(default, self.limits.max_steps) if value in (None, "") else value)

    def guidance(self, value: Any) -> float | None:
        return None if value in (None, "") else check_number("guidance", value, 0.0)

    @staticmethod
    def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise InputError(f"unknown {name} {value!r} for this model; choose from {', '.join(choices)}")
        return value

    def card(self) -> str:
        """Markdown: where the model comes from, what it was trained with, its size and its ShapesEval scores."""
        return model_card(self.pipe, self.model_dir)


def whole_number(name: str, value: Any, low: int, high: int) -> int:
    """A whole number in [low, high] from the page's number field."""
    number = check_number(name, value, low, high)
    if number != int(number):
        raise InputError(f"{name} must be a whole number, got {value}")
    return int(number)


def whole_seed(value: Any) -> int:
    """A seed in [0, 2**63) from the page's number field."""
    try:
        seed = int(float(value))
    except (TypeError, ValueError):
        raise InputError(f"the seed must be a whole number, got {value!r}") from None
    if seed != float(value) or not 0 <= seed < 2**63:
        raise InputError(f"the seed must be a whole number from 0 to 2^63 - 1, got {value}")
    return seed


def step_counter(progress: Progress | None, total: int) -> Callable[[int, Any, Any], None] | None:
    """A pipeline ``callback`` that reports ``(steps done, total)`` to ``progress``."""
    if progress is None:
        return None
    done = [0]

    def callback(step: int, timestep: Any, latents: Any) -> None:
        done[0] += 1
        progress(min(done[0], total), total)

    return callback


def mask_from_strokes(layers: list[Image.Image | np.ndarray] | None, size: tuple[int, int]) -> Image.Image | None:
    """The edit mask (mode L, white = edit) painted in the editor's layers, or None where nothing was painted."""
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers or []:
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        if layer.size != size:
            layer = layer.resize(size, Image.Resampling.NEAREST)
        array = np.asarray(layer.convert("RGBA"))
        painted |= array[..., 3] > 0
    return Image.fromarray(painted.astype(np.uint8) * 255, mode="L") if painted.any() else None


def model_card(pipe: Text2ImagePipeline, model_dir: Path | None) -> str:
    """The card of :meth:`Studio.card`; reads ``options.yaml`` and ``eval/shapes_eval.json`` of the run folder."""
    lines = ["### Model"]
    lines.append(f"- folder: `{model_dir}`" if model_dir else "- built in Python (no folder)")
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in pipe.components.items()
             if isinstance(m, torch.nn.Module)}  # fmt: skip
    lines.append("- parameters: " + ", ".join(f"{name} {count / 1e6:.2f} M" for name, count in sizes.items()))
    lines.append(f"- noise process: {type(pipe.noise_process).__name__}; default guidance {pipe.guidance_scale:g}")
    if pipe.guide is not None:
        lines.append(f"- autoguidance by its own weaker copy (`guide/`): guide scale {pipe.guide_scale:g} with "
                     f"guidance {pipe.guide_guidance_scale:g}; guide scale 0 samples without it")  # fmt: skip
    run = model_dir.parent if model_dir else None
    options = run / "options.yaml" if run else None
    if options and options.is_file():
        import yaml

        trained = yaml.safe_load(options.read_text(encoding="utf-8")) or {}
        data, model = trained.get("data", {}) or {}, trained.get("model", {}) or {}
        run_options = trained.get("run", {}) or {}
        keys = [("data", data.get("data")), ("backbone", model.get("backbone")), ("size", model.get("model_size")),
                ("scheduler", model.get("scheduler")), ("at most steps", run_options.get("steps")),
                ("minutes", run_options.get("minutes"))]  # fmt: skip
        shown = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in keys if v not in (None, "")]
        lines.append("- trained with: " + ", ".join(shown))
        lines.append(f"- every option: `{options}`")
    metrics = run / "logs" / "metrics.jsonl" if run else None
    if metrics and metrics.is_file():
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            last = json.loads(rows[-1])
            lines.append(f"- trained {last.get('step', '?')} steps in {float(last.get('time', 0)) / 60:.1f} min")
    scores = run / "eval" / "shapes_eval.json" if run else None
    if scores and scores.is_file():
        report = json.loads(scores.read_text())
        lines += ["", "### ShapesEval", "", "| category | n | accuracy |", "| --- | ---: | ---: |"]
        lines.append(f"| overall | | {report['overall']:.3f} |")
        for name, entry in report["categories"].items():
            if entry.get("accuracy") is not None:
                lines.append(f"| {name} | {entry['n']} | {entry['accuracy']:.3f} |")
    else:
        lines.append("- ShapesEval: not run (`cyclediffusion eval --model RUN` writes `RUN/eval/shapes_eval.json`)")
    return "\n".join(lines)
