"""Few-step distillation (`cyclediffusion distill`): the noise-process maths it rests on, a student that closes the
gap to its teacher's many-step samples, the exported defaults, exact resume and the command's bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training import run_cli, write_folder

from cyclediffusion.diffusion import create_noise_process
from cyclediffusion.pipelines import Text2ImagePipeline
from cyclediffusion.training import DataOptions, DistillOptions, RunOptions, distill_text2image

from helpers import randomise_zeros, tiny_pipeline, train

PROCESSES = [
    ("flow", {}),
    ("flow", {"shift": 3.0}),
    ("ddpm", {"prediction_type": "epsilon"}),
    ("ddpm", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("ddpm", {"prediction_type": "x0", "timestep_spacing": "leading"}),
]


@pytest.mark.parametrize("name,options", PROCESSES)
def test_the_student_target_makes_one_step_land_where_the_teacher_did(name, options):
    """x0_through: a DDIM (Euler) step with the prediction of that x0 goes from x_t to x_prev, on every step of a
    grid, the last one (onto the clean end) included."""
    process = create_noise_process(name, **options)
    g = torch.Generator().manual_seed(0)
    for t, t_prev in process.grid(4):
        x_t, x_prev = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        x0 = process.x0_through(x_t, t, x_prev, t_prev)
        alpha, sigma = process.alpha_sigma(t, x_t)
        prediction = process.target(x0, (x_t - alpha * x0) / sigma, t)
        torch.testing.assert_close(process.step(prediction, x_t, t, t_prev), x_prev, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name,options", PROCESSES)
@pytest.mark.parametrize("steps,substeps", [(1, 3), (4, 4), (3, 2)])
def test_the_teacher_grid_splits_each_student_step(name, options, steps, substeps):
    process = create_noise_process(name, **options)
    groups = process.nested_grid(steps, substeps)
    assert len(groups) == steps and all(len(group) == substeps for group in groups)
    for (t, t_prev), group in zip(process.grid(steps), groups):
        assert group[0][0] == t and group[-1][1] == t_prev
        assert all(a[1] == b[0] for a, b in zip(group, group[1:]))  # contiguous
        assert all(s >= s_prev for s, s_prev in group)  # towards the clean end (or staying put)
    if name == "flow" and not options:
        fine = [time for group in groups for pair in group for time in pair]
        assert fine == pytest.approx([time for pair in process.grid(steps * substeps) for time in pair], abs=1e-6)
    with pytest.raises(ValueError, match="at least 1"):
        process.nested_grid(steps, 0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """``teacher(backbone, process) -> (data, teacher folder)``: one imagefolder and one trained teacher per kind
    for the whole module."""
    root = tmp_path_factory.mktemp("distill")
    data = write_folder(root / "data")
    made: dict[tuple[str, str], Path] = {}

    def get(backbone: str, process: str) -> tuple[Path, Path]:
        if (backbone, process) not in made:
            made[backbone, process] = teacher_folder(root / f"{backbone}_{process}", data, backbone, process)
        return data, made[backbone, process]

    return get


def teacher_folder(path: Path, data: Path, backbone: str, process: str) -> Path:
    """A tiny pixel-space model for 16 px images trained briefly on ``data`` (so that its sampling paths bend the
    way a trained model's do), saved like an exported one with guidance 3."""
    torch.manual_seed(0)
    pipe = tiny_pipeline(backbone, process, size=16)
    randomise_zeros(pipe.denoiser)
    x0, captions = read_folder(data)
    train(pipe, x0, captions, steps=150, lr=3e-3)
    pipe.guidance_scale = 3.0
    pipe.save_pretrained(path)
    return path


def read_folder(data: Path) -> tuple[torch.Tensor, list[str]]:
    """The images of a :func:`write_folder` imagefolder in [-1, 1], and their captions."""
    rows = [json.loads(line) for line in (data / "metadata.jsonl").open()]
    pixels = [np.asarray(Image.open(data / row["file_name"]), dtype=np.float32) for row in rows]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1, [row["text"] for row in rows]


def distill_run(out: Path, data: Path, teacher: Path, steps: int, start_from: str = "data", **run) -> Path:
    options = dict(out=str(out), steps=steps, batch_size=8, lr=3e-4, warmup=2, log_every=1, progress=False)
    return distill_text2image(
        DataOptions(data=str(data), image_size=16),
        RunOptions(**{**options, "ema_decay": 0, **run}),
        DistillOptions(teacher=str(teacher), student_steps=2, teacher_substeps=4, start_from=start_from),
    )


def step_gaps(pipe: Text2ImagePipeline, teacher: Text2ImagePipeline, data: Path, guidance: float) -> float:
    """Mean squared distance between one step of ``pipe`` (at ``guidance``) and four guided steps of the teacher
    across each of the two student steps, from the data noised to the step's start (what distillation trains)."""
    x0, captions = read_folder(data)
    process, g = teacher.noise_process, torch.Generator().manual_seed(5)
    slow, fast = (p.prompt_guidance(captions, w, 1) for p, w in ((teacher, teacher.guidance_scale), (pipe, guidance)))
    slow_fn, fast_fn = (p.guided_model_fn(c.cond, c.uncond, c.scale) for p, c in ((teacher, slow), (pipe, fast)))
    gaps = []
    with torch.no_grad():
        for (t, t_prev), substeps in zip(process.grid(2), process.nested_grid(2, 4)):
            x_t = process.add_noise(x0, torch.randn(x0.shape, generator=g), t)
            x = x_t
            for s, s_prev in (pair for pair in substeps if pair[0] != pair[1]):
                x = process.step(slow_fn(x, process.model_time_of(s, x)), x, s, s_prev)
            one = process.step(fast_fn(x_t, process.model_time_of(t, x_t)), x_t, t, t_prev)
            gaps.append(float(((one - x) ** 2).mean()))
    return sum(gaps) / len(gaps)


@pytest.mark.parametrize("backbone,process", [("dit", "flow"), ("unet", "ddpm")])
def test_a_distilled_student_lands_near_its_teacher_in_a_quarter_of_the_steps(tmp_path, teacher, backbone, process):
    """After distillation one student step goes where four guided teacher steps go, much closer than one guided
    step of the teacher itself (the few-step sampler it replaces); it samples in its own steps without guidance."""
    data, teacher_dir = teacher(backbone, process)
    student_dir = distill_run(tmp_path / "run", data, teacher_dir, steps=60)

    slow = Text2ImagePipeline.from_pretrained(teacher_dir)
    student = Text2ImagePipeline.from_pretrained(student_dir)
    assert (student.guidance_scale, student.num_inference_steps) == (1.0, 2)
    assert (
        slow.num_inference_steps is None
        and "_num_inference_steps" not in (teacher_dir / "model_index.json").read_text()
    )
    calls = []
    student("a red square", callback=lambda i, t, x: calls.append(i))
    assert len(calls) == 2  # its own steps by default, one network call each (no guidance)

    before, after = step_gaps(slow, slow, data, slow.guidance_scale), step_gaps(student, slow, data, 1.0)
    assert after < 0.6 * before, (before, after)  # measured: 0.29x (DiT, flow), 0.41x (U-Net, DDPM)
    a, b = (load_file(d / "text_encoder" / "model.safetensors") for d in (teacher_dir, student_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the text encoder is the teacher's, frozen
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "run" / "logs" / "metrics.jsonl").open()]
    # the loss about halves in 60 steps (last ten against first ten: 0.50x for the U-Net in fp32 on an AVX2 CPU)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


@pytest.mark.parametrize("start_from", ["noise", "student"])
@pytest.mark.parametrize("backbone,process", [("dit", "flow"), ("unet", "ddpm")])
def test_a_student_trained_from_sampling_paths_samples_like_the_teacher(tmp_path, teacher, backbone, process,
                                                                        start_from):  # fmt: skip
    """``start_from="noise"`` (the teacher's own paths) or ``"student"`` (the student's own earlier steps): the
    student's 2-step samples from pure noise come much closer to the teacher's 8 guided steps from the same noise
    than the teacher's own 2 guided steps do."""
    data, teacher_dir = teacher(backbone, process)
    student = Text2ImagePipeline.from_pretrained(
        distill_run(tmp_path / "run", data, teacher_dir, steps=40, batch_size=4, start_from=start_from)
    )
    pipe = Text2ImagePipeline.from_pretrained(teacher_dir)
    prompts = ["a red square", "a blue square", "a green square", "a yellow square"] * 2
    noise = torch.randn(len(prompts), 3, 16, 16, generator=torch.Generator().manual_seed(7))

    slow, process = noise, pipe.noise_process
    guided = pipe.prompt_guidance(prompts, pipe.guidance_scale, 1)
    model_fn = pipe.guided_model_fn(guided.cond, guided.uncond, guided.scale)
    with torch.no_grad():  # the teacher's 8 guided steps across the student's 2 (DDPM's 8-step grid is another)
        for s, s_prev in (pair for path in process.nested_grid(2, 4) for pair in path if pair[0] != pair[1]):
            slow = process.step(model_fn(slow, process.model_time_of(s, slow)), slow, s, s_prev)

    def gap(sampler: Text2ImagePipeline, **kwargs) -> float:
        fast = sampler(prompts, latents=noise, output_type="latent", **kwargs).images
        return float(((fast - slow) ** 2).mean())

    before, after = gap(pipe, num_inference_steps=2), gap(student)
    # measured: noise 0.54x (DiT, flow) / 0.38x (U-Net, DDPM); student 0.81x / 0.56x (it learns the teacher's steps
    # from its own points, which lie off the teacher's path, so it follows that path less closely)
    assert after < (0.6 if start_from == "noise" else 0.9) * before, (before, after)


def test_a_resumed_distillation_equals_an_uninterrupted_one(tmp_path, teacher):
    data, teacher_dir = teacher("dit", "flow")
    straight = distill_run(tmp_path / "a", data, teacher_dir, steps=4)
    distill_run(tmp_path / "b", data, teacher_dir, steps=2)
    resumed = distill_run(tmp_path / "b", data, teacher_dir, steps=4)
    a, b = (load_file(d / "denoiser" / "model.safetensors") for d in (straight, resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert not all(torch.equal(a[k], load_file(teacher_dir / "denoiser" / "model.safetensors")[k]) for k in a)


def test_distill_command_and_its_bad_input(tmp_path, teacher, monkeypatch, capsys):
    data, teacher_dir = teacher("dit", "flow")
    common = ["distill", "--teacher", str(teacher_dir), "--data", str(data), "--steps", "2", "--batch-size", "4"]
    assert run_cli(*common, "--out", "run", "--image-size", "16", "--student-steps", "3", cwd=tmp_path,
                   monkeypatch=monkeypatch) == 0  # fmt: skip
    assert Text2ImagePipeline.from_pretrained(tmp_path / "run").num_inference_steps == 3
    for args, message in (
        (["--out", "r2", "--image-size", "32"], "makes 16px images but --image-size is 32"),
        (["--out", "r3", "--image-size", "16", "--student-steps", "0"], "positive integer"),
        (["--out", "r4", "--image-size", "16", "--guidance", "-1"], "must be non-negative"),
        (["--out", "r5", "--image-size", "16", "--guide-scale", "-1"], "--guide-scale must be non-negative"),
        (["--out", "r6", "--image-size", "16", "--guide-scale", "2"], "--guide-scale needs a teacher that carries"),
    ):
        capsys.readouterr()
        assert run_cli(*common, *args, cwd=tmp_path, monkeypatch=monkeypatch) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if "cyclediffusion" in line]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_student_start_points_are_where_the_students_own_steps_lead(teacher):
    """``start_from="student"``: a row drawn for student step 0 starts at its latent noised to the start of the
    grid; a row drawn for step 2 at where two of the student's own (unguided) steps take that point."""
    from cyclediffusion.training.distill import DistillModule
    from cyclediffusion.training.modules import OptimConfig

    _, teacher_dir = teacher("dit", "flow")
    module = DistillModule(Text2ImagePipeline.from_pretrained(teacher_dir), OptimConfig(), student_steps=4,
                           start_from="student")  # fmt: skip
    process, student = module.noise_process, module.denoiser
    guidance = module.teacher.prompt_guidance(["a red square", "a blue square"], 1.0, 1)
    x0, noise = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    starts = module.student_steps_to(torch.tensor([0, 2]), x0, noise, guidance.cond)
    grid = process.grid(4)
    x = process.add_noise(x0, noise, torch.full((2,), float(grid[0][0])))
    torch.testing.assert_close(starts[0], x[0])
    cond = guidance.cond
    with torch.no_grad():
        for t, t_prev in grid[:2]:
            out = student(x, process.model_time_of(t, x), cond.context, cond.pooled, cond.mask)
            x = process.step(out, x, t, t_prev)
    torch.testing.assert_close(starts[1], x[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(starts[1], process.add_noise(x0, noise, torch.full((2,), float(grid[2][0])))[1])


@pytest.mark.parametrize("guide_scale", [None, 0.0, "default"])
def test_the_teacher_steps_are_what_the_teacher_samples_with(tmp_path, teacher, guide_scale):
    """A teacher whose folder holds an autoguidance model: with ``guide_scale=None`` the steps a distillation step
    trains on are taken as the teacher samples by default, guide and the guide's guidance included, and across the
    whole grid from pure noise they land where the teacher's own call lands; with ``guide_scale=0`` (the default)
    they land where the call without the guide does, elsewhere."""
    from cyclediffusion.training.distill import DistillModule
    from cyclediffusion.training.modules import OptimConfig

    data, teacher_dir = teacher("dit", "flow")
    pipe, guide = (Text2ImagePipeline.from_pretrained(teacher_dir) for _ in range(2))
    with torch.no_grad():  # a weaker model of the same kind
        for p in guide.denoiser.parameters():
            p.mul_(0.8)
    parts = (pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.denoiser, pipe.noise_process, 3.0)
    Text2ImagePipeline(*parts, guide=guide, guide_scale=1.5, guide_guidance_scale=2.0).save_pretrained(tmp_path / "t")
    guided = Text2ImagePipeline.from_pretrained(tmp_path / "t")
    options = {} if guide_scale == "default" else {"guide_scale": guide_scale}
    module = DistillModule(guided, OptimConfig(), student_steps=2, teacher_substeps=4, **options)
    seen = []
    module.teacher_steps = lambda x, path, model_fn: seen.append(model_fn) or x  # the model_fn a step trains on
    x0, captions = read_folder(data)
    module.step_losses({"step": torch.tensor([0]), "caption": captions[:4], "pixels": x0[:4]})

    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = noise
    for path in module.paths:  # the whole nested grid, student step by student step
        x = DistillModule.teacher_steps(module, x, path.expand(4, -1), seen[0])
    own = {scale: guided(captions[:4], latents=noise, num_inference_steps=8, output_type="latent",
                         guide_scale=scale).images for scale in (None, 0.0)}  # fmt: skip
    torch.testing.assert_close(x, own[guide_scale if guide_scale is None else 0.0], atol=1e-5, rtol=1e-4)
    assert (own[None] - own[0.0]).abs().max() > 1e-2  # the guide changes where the teacher goes
