"""The Gradio app over :class:`~cyclediffusion.ui.studio.Studio`: Generate, Edit, Translate and Model tabs.

Analytics are switched off before Gradio is imported and the theme uses the system's fonts, so the page makes no
request beyond the server it came from. Bad input reaches the page as one message (``gr.Error``), never a trace.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no request leaves the machine

import shlex  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import wraps  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from ..pipelines.implicit_mask import THRESHOLD  # noqa: E402
from .limits import InputError, Limits  # noqa: E402
from .studio import MAX_MASK_THRESHOLD, MAX_RESAMPLE, Studio, mask_from_strokes  # noqa: E402

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
# Small models draw small images: show them enlarged, pixel for pixel.
CSS = ".pixels img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def page_errors(fn: Callable) -> Callable:
    """``fn`` with the user's mistakes (:class:`InputError`, the pipelines' ``ValueError``) shown in the page."""

    @wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (InputError, ValueError) as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapped


def readable_uploads(component: Any) -> Any:
    """``component`` (an image input) with uploads it cannot read turned into a message instead of a trace.

    Wrapped on the instance: a subclass of a Gradio component would make Gradio write a ``.pyi`` stub beside
    this module and look for a frontend of its own."""
    preprocess = component.preprocess

    @wraps(preprocess)
    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            message = f"the upload is not an image this server can read ({type(err).__name__})"
            raise gr.Error(message, print_exception=False) from None

    component.preprocess = checked
    return component


def reporter(progress: gr.Progress) -> Callable[[int, int], None]:
    return lambda done, total: progress((done, total), desc="sampling", unit="steps")


def build_app(studio: Studio, title: str = "cyclediffusion") -> gr.Blocks:
    """The page: Generate, Edit, (Translate with a target model) and Model tabs, queued within ``studio.limits``."""
    limits = studio.limits
    model_name = str(studio.model_dir.parent if studio.model_dir else "MODEL")
    width, height = studio.image_size
    guided = studio.pipe.guide  # a model that carries its autoguidance model: Generate offers its weight

    @page_errors
    def generate(prompt, negative, steps, guidance, sampler, seed, count, guide_scale=None,
                 progress=gr.Progress()):  # noqa: B008  # fmt: skip
        out = studio.generate(prompt, negative, steps, guidance, sampler, seed, count, reporter(progress), guide_scale)
        command = ["cyclediffusion", "sample", "--model", model_name, "--prompt", prompt.strip(), "--steps", steps]
        command += [] if guidance in (None, "") else ["--guidance", guidance]
        command += [] if guide_scale in (None, "") or guided is None else ["--guide-scale", guide_scale]
        command += ["--sampler", sampler, "--seed", out.seeds[0], "--num-images", len(out.seeds)]
        gallery = [(image, f"seed {seed}") for image, seed in zip(out.images, out.seeds)]
        again = shlex.join(str(c) for c in command)
        return gallery, f"Image *i* has seed {out.seeds[0]} + *i*; the same images again:\n\n```\n{again}\n```"

    @page_errors
    def draw(source_prompt, seed, progress=gr.Progress()):  # noqa: B008
        image = studio.generate(source_prompt, seed=seed, progress=reporter(progress)).images[0]
        return {"background": image, "layers": [], "composite": image}

    @page_errors
    def edit(value, source_prompt, prompt, method, strength, eta, guidance, source_guidance, steps, seed,
             auto_mask=False, resample=0, mask_threshold=THRESHOLD, progress=gr.Progress()):  # noqa: B008  # fmt: skip
        image = limits.image((value or {}).get("background"))
        mask = mask_from_strokes((value or {}).get("layers"), image.size)
        if mask is None and auto_mask:
            mask = "auto"
        result = studio.edit(image, source_prompt, prompt, method, strength, eta, guidance, source_guidance, steps,
                             seed, mask, reporter(progress), resample, mask_threshold)  # fmt: skip
        return studio.model_input(image), result

    @page_errors
    def translate(image, source_prompt, prompt, strength, eta, guidance, steps, seed, progress=gr.Progress()):  # noqa: B008
        result = studio.translate(image, source_prompt, prompt, strength, eta, guidance, steps, seed,
                                  reporter(progress))  # fmt: skip
        return studio.model_input(image), result

    def steps_slider(value: int = 50) -> gr.Slider:
        return gr.Slider(1, limits.max_steps, value=min(value, limits.max_steps), step=1, label="steps")

    def chain_sliders() -> tuple[gr.Slider, gr.Slider]:
        return (
            gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="strength (how far into the chain)"),
            gr.Slider(0.0, 1.0, value=0.1, step=0.05, label="eta (> 0 for cycle and ef_ddpm)"),
        )

    def shown_image(label: str, **kwargs: Any) -> gr.Image:
        """An output image, enlarged pixel for pixel."""
        return gr.Image(label=label, type="pil", format="png", interactive=False, height=300,
                        elem_classes=["pixels"], **kwargs)  # fmt: skip

    def guidance_box(value: float = studio.pipe.guidance_scale) -> gr.Number:
        return gr.Number(value=value, label="guidance", minimum=0)

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nModel `{model_name}`, images of {width}x{height} pixels.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="prompt", value="a red circle", elem_id="gen-prompt")
                    negative = gr.Textbox(label="negative prompt")
                    with gr.Row():
                        steps = steps_slider(studio.pipe.default_steps)
                        guidance = guidance_box(studio.pipe.guidance_scale if guided is None
                                                else studio.pipe.guide_guidance_scale)  # fmt: skip
                        guide_scale = gr.Number(value=studio.pipe.guide_scale, minimum=0, visible=guided is not None,
                                                label="guide scale (autoguidance; 0: off)")  # fmt: skip
                    with gr.Row():
                        sampler = gr.Dropdown(list(studio.samplers), value=studio.samplers[0], label="sampler")
                        seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                        count = gr.Slider(1, limits.max_images, value=min(4, limits.max_images), step=1,
                                          label="images")  # fmt: skip
                    button = gr.Button("Generate", variant="primary", elem_id="gen-button")
                with gr.Column():
                    gallery = gr.Gallery(label="images", columns=4, format="png", elem_id="gen-gallery")
                    again = gr.Markdown()
            button.click(generate, [prompt, negative, steps, guidance, sampler, seed, count, guide_scale],
                         [gallery, again], api_name="generate")  # fmt: skip

        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    editor = readable_uploads(
                        gr.ImageEditor(
                            label="image (paint where to edit; no paint: everywhere)",
                            type="pil",
                            format="png",
                            sources=["upload", "clipboard"],
                            elem_id="edit-image",
                        )
                    )
                    source_prompt = gr.Textbox(label="source prompt (what the image shows)", value="a red circle",
                                               elem_id="edit-source")  # fmt: skip
                    draw_button = gr.Button("Draw the source prompt with the model")
                    target_prompt = gr.Textbox(label="target prompt (what it should show)", value="a blue circle",
                                               elem_id="edit-target")  # fmt: skip
                    method = gr.Dropdown(list(studio.methods), value="cycle", label="method")
                    auto_mask = gr.Checkbox(False, label="no paint: edit only where the two prompts differ (auto mask)")
                    mask_threshold = gr.Slider(0.05, MAX_MASK_THRESHOLD, value=THRESHOLD, step=0.05,
                                               label="auto mask cut (lower: more of the image may change)")  # fmt: skip
                    resample = gr.Slider(0, MAX_RESAMPLE, value=0, step=1, label="with a mask: resample passes "
                                         "(each step redrawn inside the mask; 2 is a good choice)")  # fmt: skip
                    with gr.Row():
                        strength, eta = chain_sliders()
                    with gr.Row():
                        edit_guidance = guidance_box()
                        source_guidance = gr.Number(value=1.0, label="source guidance", minimum=0)
                    with gr.Row():
                        edit_steps = steps_slider()
                        edit_seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                with gr.Column(), gr.Row():
                    shown_source = shown_image("source")
                    result = shown_image("result", elem_id="edit-result")
            draw_button.click(draw, [source_prompt, edit_seed], editor, api_name="draw")
            edit_button.click(edit, [editor, source_prompt, target_prompt, method, strength, eta, edit_guidance,
                                     source_guidance, edit_steps, edit_seed, auto_mask, resample,
                                     mask_threshold],
                              [shown_source, result],
                              api_name="edit")  # fmt: skip

        if studio.target is not None:
            with gr.Tab("Translate"):
                with gr.Row():
                    with gr.Column():
                        tr_image = readable_uploads(
                            gr.Image(label="image of the source model's domain", type="pil", format="png")
                        )
                        tr_source = gr.Textbox(label="source prompt (may be empty)")
                        tr_prompt = gr.Textbox(label="target prompt (default: the source prompt)")
                        with gr.Row():
                            tr_strength, tr_eta = chain_sliders()
                        with gr.Row():
                            tr_guidance = gr.Number(value=None, label="guidance (empty: translation's default)")
                            tr_steps = steps_slider()
                            tr_seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                        tr_button = gr.Button("Translate", variant="primary")
                    with gr.Column(), gr.Row():
                        tr_shown = shown_image("source")
                        tr_result = shown_image("translated")
                inputs = [tr_image, tr_source, tr_prompt, tr_strength, tr_eta, tr_guidance, tr_steps, tr_seed]
                tr_button.click(translate, inputs, [tr_shown, tr_result], api_name="translate")

        with gr.Tab("Model"):
            gr.Markdown(studio.card(), elem_id="model-card")
    app.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    return app


def launch(app: gr.Blocks, limits: Limits, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Start ``app`` on ``host:port`` without blocking; returns the page's address."""
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,
        max_file_size=int(limits.max_upload_mb * 1024 * 1024),
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS),  # no font from the web
        css=CSS,
    )
    return app.local_url or f"http://{host}:{port}/"
