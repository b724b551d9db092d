"""The web UI: the Studio's checks and numbers, then the Gradio server through ``gradio_client`` as a script would."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclediffusion.ui import InputError, Limits, Studio
from cyclediffusion.ui.studio import mask_from_strokes

from helpers import randomise_zeros, tiny_pipeline

SIZE = 16


def tiny_model(folder: Path, process: str = "ddpm", seed: int = 0) -> Path:
    """A saved pixel-space pipeline whose denoiser says something (a run folder with ``model/``)."""
    torch.manual_seed(seed)
    pipe = tiny_pipeline("unet", process, size=SIZE)
    randomise_zeros(pipe.denoiser)
    pipe.save_pretrained(folder / "model")
    return folder


def picture(seed: int = 3, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("ui_model"))


@pytest.fixture(scope="module")
def studio(model_dir) -> Studio:
    return Studio(model_dir, model_dir, device="cpu", dtype="float32", limits=Limits(max_steps=30, max_images=4))


# ----------------------------------------------------------------------------------------------- Studio (no server)
def test_generate_gives_the_images_asked_for_and_each_seed_redraws_its_image(one_thread, studio):
    out = studio.generate("a red square", steps=6, guidance=2.0, seed=5, num_images=3)
    assert out.seeds == [5, 6, 7]
    assert [im.size for im in out.images] == [(SIZE, SIZE)] * 3
    alone = studio.generate("a red square", steps=6, guidance=2.0, seed=6, num_images=1).images[0]
    assert np.abs(pixels(alone) - pixels(out.images[1])).max() <= 1  # what `sample --seed 6` draws
    assert np.abs(pixels(out.images[0]) - pixels(out.images[1])).max() > 10  # seeds differ


def test_progress_reports_every_step(one_thread, studio):
    seen: list[tuple[int, int]] = []
    studio.generate("a blue circle", steps=7, num_images=1, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 7) for i in range(1, 8)]
    seen.clear()
    studio.edit(picture(), "a red square", "a blue circle", strength=0.5, steps=8,
                progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert seen[-1] == (4, 4) and len(seen) == 4


def test_edit_with_the_same_prompt_and_guidance_gives_back_the_input(one_thread, studio):
    image = picture()
    for method in ("cycle", "ef_ddpm"):  # exact by construction (DDIM inversion is not: its error grows with w)
        out = studio.edit(image, "a red square", "a red square", method=method, guidance=2.0, source_guidance=2.0,
                          steps=10, seed=1)  # fmt: skip
        assert np.abs(pixels(out) - pixels(image)).max() <= 1, method
    changed = studio.edit(image, "a red square", "a blue circle", guidance=2.0, source_guidance=2.0, steps=10)
    assert np.abs(pixels(changed) - pixels(image)).max() > 5


def test_a_painted_mask_keeps_everything_outside(one_thread, studio):
    strokes = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), (0, 0, SIZE // 2, SIZE))  # painted: the left half
    mask = mask_from_strokes([strokes], (SIZE, SIZE))
    assert np.asarray(mask)[:, : SIZE // 2].min() == 255 and np.asarray(mask)[:, SIZE // 2 :].max() == 0
    assert mask_from_strokes([Image.new("RGBA", (SIZE, SIZE))], (SIZE, SIZE)) is None  # nothing painted
    image = picture()
    out = studio.edit(image, "a red square", "a blue circle", guidance=3.0, steps=10, mask=mask)
    diff = np.abs(pixels(out) - pixels(image))
    assert diff[:, SIZE // 2 :].max() == 0  # outside the mask: the input, exactly
    assert diff[:, : SIZE // 2].max() > 5  # inside: edited
    resampled = studio.edit(image, "a red square", "a blue circle", guidance=3.0, steps=10, mask=mask, resample=2)
    assert np.abs(pixels(resampled) - pixels(image))[:, SIZE // 2 :].max() == 0
    assert np.abs(pixels(resampled) - pixels(out))[:, : SIZE // 2].max() > 0  # the inside is redrawn


def test_auto_mask_edits_only_where_the_prompts_part(one_thread, studio):
    # this tiny model's estimates part a little everywhere: read its mask at the cut tests/test_edit.py uses for it
    image = picture(6)
    options = dict(guidance=3.0, steps=10, mask="auto", mask_threshold=0.3)
    same = studio.edit(image, "a red square", "a red square", **options)
    assert np.abs(pixels(same) - pixels(image)).max() <= 1  # equal prompts: nothing to edit, whatever the guidance
    changed = studio.edit(image, "a red square", "a blue circle", **options)
    kept = (pixels(changed) == pixels(image)).all(axis=-1)
    assert 0 < kept.mean() < 1  # some cells read as changed, the rest pasted back exactly
    wider = studio.edit(image, "a red square", "a blue circle", **{**options, "mask_threshold": 0.05})
    assert (pixels(wider) == pixels(image)).all(axis=-1).mean() < kept.mean()  # a lower cut lets more change


def test_translate_to_the_same_model_gives_back_the_input(one_thread, studio):
    image = picture(4)
    out = studio.translate(image, "a red square", "a red square", guidance=1.0, steps=10)
    assert np.abs(pixels(out) - pixels(image)).max() <= 1


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda s: s.generate(""), "prompt is empty"),
        (lambda s: s.generate("red " * 40), "tokens long; the model reads at most 12"),
        (lambda s: s.generate("a red square", negative_prompt="blue " * 40), "negative prompt is"),
        (lambda s: s.generate("a red square", steps=31), "steps must be a whole number from 1 to 30"),
        (lambda s: s.generate("a red square", num_images=5), "number of images must be a whole number from 1 to 4"),
        (lambda s: s.generate("a red square", sampler="heun"), "unknown sampler 'heun'"),
        (lambda s: s.generate("a red square", seed=-1), "seed must be a whole number"),
        (lambda s: s.edit(None, "a red square", "a blue circle"), "upload an image first"),
        (lambda s: s.edit(picture(size=1100), "a", "b"), "pixels; at most 1048576 are allowed"),
        (lambda s: s.edit(picture(), "a red square", "a blue circle", eta=0), "eta must be above 0 for cycle"),
        (lambda s: s.edit(picture(), "a red square", "a blue circle", method="flowedit"), "unknown method"),
        (lambda s: s.edit(picture(), "a red square", "a blue circle", strength=1.5), "strength must be"),
        (lambda s: s.edit(picture(), "a red square", "a blue circle", resample=1), "paint where to edit"),
        (lambda s: s.edit(picture(), "a", "b", mask="auto", resample=1.5), "resample passes must be a whole"),
        (lambda s: s.edit(picture(), "a", "b", mask="auto", resample=9), "at most 4"),
        (lambda s: s.edit(picture(), "a", "b", mask="auto", mask_threshold=0), "auto mask cut must be above 0"),
        (lambda s: s.edit(picture(), "a", "b", mask="auto", mask_threshold=1), "auto mask cut must be above 0"),
        (
            lambda s: s.edit(
                picture(),
                "a red square",
                "a blue circle",
                method="ddim_inversion",
                steps=10,
                mask=Image.new("L", (SIZE, SIZE), 255),
            ),
            "cannot keep what lies outside a mask",
        ),  # fmt: skip
    ],
)
def test_bad_input_is_one_clear_message(studio, call, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        call(studio)


def test_translation_without_a_target_model_says_how_to_get_one(model_dir):
    with pytest.raises(InputError, match="--target-model"):
        Studio(model_dir, device="cpu").translate(picture(), "a", "b")


def test_flow_models_offer_flowedit_and_their_own_samplers(tmp_path):
    flow = Studio(tiny_model(tmp_path, "flow"), device="cpu")
    assert "flowedit" in flow.methods and flow.samplers[0] == "euler"


def test_model_card_shows_the_training_options_sizes_and_scores(tmp_path, studio):
    run = tiny_model(tmp_path)
    (run / "options.yaml").write_text("data:\n  data: runs/demo/data\nmodel:\n  backbone: unet\n  scheduler: ddpm\n")
    categories = {"single": {"n": 40, "accuracy": 0.875}, "binding": {"n": 0, "accuracy": None}}
    (run / "eval").mkdir()
    (run / "eval" / "shapes_eval.json").write_text(json.dumps({"overall": 0.5, "categories": categories}))
    card = Studio(run, device="cpu").card()
    denoiser = sum(p.numel() for p in studio.pipe.denoiser.parameters()) / 1e6
    assert f"denoiser {denoiser:.2f} M" in card
    assert "data runs/demo/data" in card and "backbone unet" in card
    assert "| single | 40 | 0.875 |" in card and "| overall | | 0.500 |" in card and "binding" not in card
    assert "not run" in studio.card()  # no scores beside that model


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="max_steps"):
        Limits(max_steps=0)


# ----------------------------------------------------------------------------------------------- the server
gradio_client = pytest.importorskip("gradio_client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir):
    from cyclediffusion.ui import serve

    limits = Limits(max_steps=30, max_images=4, max_pixels=64 * 64, max_upload_mb=1)
    port = free_port()
    app = serve(model_dir, model_dir, port=port, limits=limits, device="cpu", dtype="float32", block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False)


def editor_value(path: Path) -> dict:
    return {"background": gradio_client.handle_file(str(path)), "layers": [], "composite": None}


def test_server_generates_the_requested_images(one_thread, client):
    gallery, again = client.predict("a red square", "", 5, 2.0, "ddim", 11, 3, api_name="/generate")
    assert [item["caption"] for item in gallery] == ["seed 11", "seed 12", "seed 13"]
    assert all(Image.open(item["image"]).size == (SIZE, SIZE) for item in gallery)
    assert "--seed 11 --num-images 3" in again


def test_server_edit_with_the_same_prompts_returns_the_input(one_thread, client, tmp_path):
    path = tmp_path / "in.png"
    picture(7).save(path)
    source, result = client.predict(
        editor_value(path), "a red square", "a red square", "cycle", 0.8, 0.1, 2.0, 2.0, 10, 0, True, api_name="/edit"
    )  # fmt: skip  (auto mask: empty for equal prompts)
    assert np.abs(pixels(Image.open(result)) - pixels(picture(7))).max() <= 1
    assert np.abs(pixels(Image.open(source)) - pixels(picture(7))).max() <= 1


def test_server_draws_a_source_image_to_edit(one_thread, client):
    value = client.predict("a blue circle", 3, api_name="/draw")
    assert Image.open(value["background"]).size == (SIZE, SIZE)


@pytest.mark.parametrize(
    "upload,prompt,eta,message",
    [
        ("text", "a red square", 0.1, "not an image"),
        ("large", "a red square", 0.1, "at most 4096 are allowed"),
        ("image", "red " * 40, 0.1, "tokens long"),
        ("image", "a red square", 0.0, "eta must be above 0 for cycle"),
    ],
)
def test_server_bad_input_shows_the_message(client, tmp_path, upload, prompt, eta, message):
    path = tmp_path / ("in.txt" if upload == "text" else "in.png")
    if upload == "text":
        path.write_text("not a picture")
    else:
        picture(size=80 if upload == "large" else SIZE).save(path)
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(editor_value(path), "a red square", prompt, "cycle", 0.8, eta, 2.0, 1.0, 5, 0, False,
                       api_name="/edit")  # fmt: skip


def test_server_translates_between_its_two_models(one_thread, client, tmp_path):
    path = tmp_path / "in.png"
    picture(8).save(path)
    shown, result = client.predict(gradio_client.handle_file(str(path)), "a red square", "", 0.8, 0.1, 1.0, 10, 0,
                                   api_name="/translate")  # fmt: skip
    assert np.abs(pixels(Image.open(result)) - pixels(picture(8))).max() <= 1  # same model: the input back


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cyclediffusion", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_a_model_that_fails_to_load_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for model in (tmp_path / "missing", tmp_path / "empty"):
        proc = run_cli("serve", "--model", str(model), "--port", str(free_port()))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "error:" in proc.stderr and "Running on" not in proc.stdout


def test_ctrl_c_stops_the_server_cleanly(model_dir):
    port = free_port()
    command = [sys.executable, "-m", "cyclediffusion", "serve", "--model", str(model_dir), "--port", str(port)]
    # a terminal's Ctrl-C: SIGINT at its default even where the test run inherits it ignored (a job started in
    # the background of a shell script), in which case Python would never raise KeyboardInterrupt
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line + proc.stderr.read()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens, on loopback
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # (reads both pipes, so a chatty server cannot block on them)
        assert proc.returncode in (0, 130), err  # stopped (130: the interrupt's own exit code)
        assert "Traceback" not in err
    finally:
        proc.kill()
    time.sleep(0.5)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # and the port is free again


def test_a_stopped_server_process_ends_even_if_a_worker_thread_would_hold_it():
    """`serve` arms `exit_soon` after the server stops: a stuck non-daemon thread cannot keep the process alive."""
    script = ("import threading, time\nfrom cyclediffusion.ui import exit_soon\n"
              "threading.Thread(target=time.sleep, args=(600,)).start()\nexit_soon(0.5)\n")  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and time.monotonic() - start < 30, proc.stderr
    assert "did not stop" in proc.stderr


def test_the_pins_give_a_working_gradio():
    """constraints.txt pins pillow below 13 because gradio 6 asks for it: every pin is installed as pinned and
    gradio's own pillow requirement holds (pip would otherwise fall back to a gradio that fails on import)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins = dict(
        line.split("==") for line in (Path(__file__).parents[1] / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    assert pins["gradio"].startswith("6.")
    for name, version in pins.items():
        if name != "torch":  # the CPU build carries a local version (2.13.0+cpu)
            assert metadata.version(name) == version, name
    wants = [Requirement(r) for r in metadata.requires("gradio") if r.lower().startswith("pillow")]
    assert wants and all(r.specifier.contains(pins["pillow"]) for r in wants)


def test_a_model_that_carries_a_guide_generates_with_it_unless_its_weight_is_zero(one_thread, tmp_path):
    from cyclediffusion import Text2ImagePipeline

    good, weak = (Text2ImagePipeline.from_pretrained(tiny_model(tmp_path / name, seed=seed)) for name, seed in
                  (("good", 0), ("weak", 1)))  # fmt: skip
    Text2ImagePipeline(**good.components, guide=weak).save_pretrained(tmp_path / "carrying" / "model")
    studio = Studio(tmp_path / "carrying", device="cpu", dtype="float32", limits=Limits(max_steps=30, max_images=4))

    def drawn(pipe, **kwargs) -> np.ndarray:
        return pixels(pipe("a red square", num_inference_steps=4, generator=[torch.Generator().manual_seed(3)],
                           **kwargs).images[0])  # fmt: skip

    guided = pixels(studio.generate("a red square", steps=4, seed=3).images[0])
    assert np.abs(guided - drawn(good, guide=weak, guidance_scale=2.0)).max() <= 1  # the model's own recipe
    off = pixels(studio.generate("a red square", steps=4, seed=3, guide_scale=0).images[0])
    assert np.abs(off - drawn(good)).max() <= 1
    assert np.abs(guided - off).max() > 10
    with pytest.raises(InputError, match="guide scale"):
        studio.generate("a red square", guide_scale=-1)
    assert "autoguidance" in studio.card() and "autoguidance" not in Studio(tmp_path / "good", device="cpu").card()
