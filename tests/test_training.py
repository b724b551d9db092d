"""Training: step-keyed batches, LR schedule, exact resume, DDP parity and the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cyclediffusion import Text2ImagePipeline
from cyclediffusion.cli import main
from cyclediffusion.eval import CATEGORIES
from cyclediffusion.recipes import build_noise_process as build_process
from cyclediffusion.training import DataOptions, ModelOptions, RunOptions, train_text2image
from cyclediffusion.training.callbacks import read_metrics
from cyclediffusion.training.modules import OptimConfig
from cyclediffusion.training.sampler import StepBatchSampler

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}


def write_folder(root: Path, n: int = 16, size: int = 16) -> Path:
    """A tiny imagefolder: coloured squares at random places, captioned with their colour."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        image = Image.new("RGB", (size, size), (40, 40, 40))
        x, y = (int(v) for v in torch.randint(0, size - 6, (2,), generator=g))
        image.paste(COLOURS[colour], (x, y, x + 6, y + 6))
        image.save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"a {colour} square"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_model() -> ModelOptions:
    return ModelOptions(backbone="unet", model_size="tiny", text_width=32, text_layers=1, vocab_size=300)


def tiny_run(out: Path, steps: int, **kw) -> RunOptions:
    options = dict(out=str(out), steps=steps, batch_size=4, lr=1e-3, warmup=2, log_every=1, progress=False)
    options.update(kw)
    return RunOptions(**options)


def test_step_batches_are_a_function_of_the_step():
    full = StepBatchSampler(10, batch_size=4, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(7)]
    assert [b[0][0] for b in first] == list(range(7))
    # an epoch (2 steps of 4 out of 10) never repeats an index
    assert len({i for _, i in first[0] + first[1]}) == 8
    resumed = iter(StepBatchSampler(10, batch_size=4, seed=3, start_step=5))
    assert next(resumed) == first[5] and next(resumed) == first[6]
    # two ranks of 2 together see the global batch of one rank of 4
    ranks = [iter(StepBatchSampler(10, batch_size=2, world_size=2, rank=r, seed=3)) for r in range(2)]
    for step in range(4):
        assert next(ranks[0]) + next(ranks[1]) == first[step]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(3, batch_size=4)


def test_lr_schedule():
    cos = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", total_steps=110)
    assert cos.factor(0) == pytest.approx(0.1) and cos.factor(9) == pytest.approx(1.0)
    assert cos.factor(60) == pytest.approx(0.5) and cos.factor(110) == pytest.approx(0.0, abs=1e-12)
    assert OptimConfig(warmup_steps=0).factor(10_000) == 1.0
    with pytest.raises(ValueError, match="needs the length of the run"):
        OptimConfig(schedule="cosine")
    timed = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", timed=True)
    assert timed.factor(5) == pytest.approx(0.6)  # warmup is in steps
    timed.time_fraction = 0.5
    assert timed.factor(1000) == pytest.approx(0.5)
    both = OptimConfig(warmup_steps=10, schedule="cosine", total_steps=110, timed=True, time_fraction=0.1)
    assert both.factor(60) == pytest.approx(0.5)  # the steps run out first
    both.time_fraction = 1.0
    assert both.factor(20) == pytest.approx(0.0, abs=1e-12)  # the time does


def test_wsd_schedule_is_flat_then_decays_linearly_over_the_last_share():
    wsd = OptimConfig(warmup_steps=10, schedule="wsd", total_steps=110)  # 100 steps after warmup, decay share 0.2
    assert wsd.factor(0) == pytest.approx(0.1)
    assert [wsd.factor(s) for s in (10, 50, 90)] == pytest.approx([1.0, 1.0, 1.0])  # stable until 80% of the run
    assert wsd.factor(100) == pytest.approx(0.5) and wsd.factor(110) == pytest.approx(0.0, abs=1e-12)
    timed = OptimConfig(warmup_steps=0, schedule="wsd", timed=True, decay_share=0.5, time_fraction=0.75)
    assert timed.factor(3) == pytest.approx(0.5)  # by the share of the time budget
    with pytest.raises(ValueError, match="wsd LR schedule needs the length"):
        OptimConfig(schedule="wsd")
    with pytest.raises(ValueError, match="decay_share"):
        OptimConfig(schedule="wsd", total_steps=10, decay_share=0.0)


def test_timed_cosine_decays_the_lr_over_the_time_budget(tmp_path):
    data = DataOptions(data=str(write_folder(tmp_path / "data")), image_size=16)
    run = tiny_run(tmp_path / "run", steps=None, minutes=0.1, warmup=1, lr_schedule="cosine", ema_decay=None)
    train_text2image(data, run, tiny_model())
    lrs = [r["train/lr"] for r in metrics(tmp_path / "run")]
    assert len(lrs) > 5 and lrs[1] == pytest.approx(1e-3, rel=0.2)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[1:], lrs[2:]))  # falls step by step after the warmup ...
    assert lrs[-1] < 0.25e-3  # ... to near zero when the 6 s are spent


def test_immiscible_noise_reorders_the_batch_noise_to_the_nearest_assignment(monkeypatch):
    from itertools import permutations

    from cyclediffusion.diffusion import immiscible

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, 2, 2, generator=g)
    paired = immiscible(x0, noise)
    cost = lambda order: float(((x0 - noise[list(order)]) ** 2).sum())  # noqa: E731
    best = min(permutations(range(5)), key=cost)
    torch.testing.assert_close(paired, noise[list(best)])
    assert sorted(paired.flatten().tolist()) == sorted(noise.flatten().tolist())

    # in a training step: the same draws, paired with the images they lie nearest
    from cyclediffusion import create_noise_process
    from cyclediffusion.training.modules import DiffusionModule

    from helpers import tiny_denoiser, tiny_text_encoder, tiny_tokenizer

    seen = []
    process = create_noise_process("flow")
    original = type(process).training_loss

    def spy(self, model_fn, x0, noise, t):
        seen.append((x0, noise))
        return original(self, model_fn, x0, noise=noise, t=t)

    monkeypatch.setattr(type(process), "training_loss", spy)
    tokenizer = tiny_tokenizer(max_length=20)
    batch = {"pixels": torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, "caption": ["a red square"] * 8}
    for flag in (False, True):
        torch.manual_seed(0)
        parts = (tokenizer, tiny_text_encoder(tokenizer), tiny_denoiser("unet", 3, 16), process, None, OptimConfig())
        DiffusionModule(*parts, immiscible_noise=flag).step_losses(batch | {"step": torch.zeros(8)})
    (x_a, plain), (x_b, paired) = seen
    torch.testing.assert_close(x_a, x_b)
    assert not torch.equal(plain, paired)
    assert sorted(paired.flatten().tolist()) == sorted(plain.flatten().tolist())
    assert ((x_b - paired) ** 2).sum() < ((x_a - plain) ** 2).sum()


def test_ema_update_is_the_warmed_up_average():
    from cyclediffusion.training.callbacks import ema_decay_at, ema_multi_avg_fn

    g = torch.Generator().manual_seed(0)
    averaged = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    current = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    for n in (0, 40, 10_000):
        d = ema_decay_at(0.999, n)
        assert d == min(0.999, (1 + n) / (10 + n))
        expected = [a + (c - a) * (1 - d) for a, c in zip(averaged, current)]
        ema_multi_avg_fn(0.999)(averaged, current, torch.tensor(n))
        for a, e in zip(averaged, expected):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=0)
    ids, new_ids = [torch.arange(4)], [torch.arange(4) + 2]  # integer buffers follow the model
    ema_multi_avg_fn(0.999)(ids, new_ids, torch.tensor(5))
    assert torch.equal(ids[0], new_ids[0])


def test_loss_by_noise_is_the_mean_over_the_logging_interval(monkeypatch):
    """Each bin is logged at the steps whose metrics are written, as the mean of its samples since the last one."""
    from types import SimpleNamespace

    from cyclediffusion.diffusion.base import TrainingLoss
    from cyclediffusion.training.modules import DiffusionModule

    from helpers import tiny_denoiser, tiny_text_encoder, tiny_tokenizer

    tokenizer = tiny_tokenizer(max_length=20)
    parts = (tokenizer, tiny_text_encoder(tokenizer), tiny_denoiser("unet", 3, 16), build_process("flow"), None)
    module = DiffusionModule(*parts, OptimConfig())
    logged: list[tuple[int, str, float, int]] = []
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=3)
    monkeypatch.setattr(type(module), "trainer", property(lambda self: trainer))
    monkeypatch.setattr(module, "_trainer", trainer)
    record = lambda name, v, batch_size: logged.append((trainer.global_step, name, v, batch_size))  # noqa: E731
    monkeypatch.setattr(module, "log", record)
    steps = [
        TrainingLoss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.05, 0.95, 0.07])),  # step 0: logged (first)
        TrainingLoss(torch.tensor([3.0, 5.0]), torch.tensor([0.01, 0.55])),  # step 1: kept
        TrainingLoss(torch.tensor([6.0, 8.0]), torch.tensor([0.02, 1.0])),  # step 2: logged (3rd of 3)
    ]
    for step, loss in enumerate(steps):
        trainer.global_step = step
        module.log_loss_by_noise(loss)
    assert logged == [
        (0, "loss_by_noise/bin0", 2.5, 2),
        (0, "loss_by_noise/bin9", 2.0, 1),
        (2, "loss_by_noise/bin0", 4.5, 2),
        (2, "loss_by_noise/bin5", 5.0, 1),
        (2, "loss_by_noise/bin9", 8.0, 1),
    ]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    weights = load_file(out / "model" / "denoiser" / "model.safetensors")
    weights.update({f"te.{k}": v for k, v in load_file(out / "model" / "text_encoder" / "model.safetensors").items()})
    return weights


def metrics(out: Path) -> list[dict[str, float]]:
    return read_metrics(out / "logs" / "metrics.jsonl")


def test_resume_is_exact_with_images_checked_as_they_are_read(tmp_path):
    """``--no-check-images``: a bad image met during training is replaced by the next good one, the same way in
    an uninterrupted run and in one resumed halfway."""
    root = write_folder(tmp_path / "data", n=8)
    (root / "003.png").write_text("went bad")
    data = DataOptions(data=str(root), image_size=16, check_images=False)
    straight = train_text2image(data, tiny_run(tmp_path / "a", steps=4, ema_decay=0), tiny_model())
    train_text2image(data, tiny_run(tmp_path / "b", steps=2, ema_decay=0), tiny_model())
    train_text2image(data, tiny_run(tmp_path / "b", steps=4, ema_decay=0), tiny_model())
    a, b = final_weights(straight.parent), final_weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = DataOptions(data=str(write_folder(tmp_path / "data")), image_size=16)
    straight = train_text2image(data, tiny_run(tmp_path / "a", steps=6), tiny_model())
    first = tmp_path / "b"
    train_text2image(data, tiny_run(first, steps=3), tiny_model())
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and "optimizer_states" in ckpt and "current_model_state" in ckpt
    train_text2image(data, tiny_run(first, steps=6), tiny_model())  # reruns into the same folder: resumes
    a, b = final_weights(straight.parent), final_weights(first)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    # EMA weights differ from the live ones, and training moved them
    live = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["current_model_state"]
    assert any(
        not torch.equal(live[f"denoiser.{k}"], v)
        for k, v in load_file(first / "model" / "denoiser" / "model.safetensors").items()
    )
    rows = metrics(first)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["train/loss"] > 0 for r in rows)


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The command in a fresh process (needed for DDP, which re-launches it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cyclediffusion", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """The command in this process (faster than a subprocess)."""
    monkeypatch.chdir(cwd)
    try:
        return main(list(args))
    except SystemExit as exit_:  # argparse exits on bad flags
        return int(exit_.code)


TINY_FLAGS = [
    "--image-size",
    "16",
    "--model-size",
    "tiny",
    "--text-width",
    "32",
    "--text-layers",
    "1",
    "--vocab-size",
    "300",
    "--warmup",
    "2",
    "--log-every",
    "1",
    "--lr",
    "1e-3",
]
# Runs compared to 1e-5 train in fp32: bf16 (auto on a CPU with AVX512_BF16) rounds batches of 4 and 8 apart
EXACT_FLAGS = ["--precision", "32"]


def test_cli_train_then_sample_writes_png(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data")

    def cli(*args: str, cwd: Path) -> None:
        assert run_cli(*args, cwd=cwd, monkeypatch=monkeypatch) == 0

    cli(
        "train",
        "--data",
        str(data),
        "--out",
        "run",
        "--steps",
        "4",
        "--batch-size",
        "4",
        *TINY_FLAGS,
        "--sample-every",
        "2",
        cwd=tmp_path,
    )
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    assert any((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))
    cli("sample", "--model", "run", "--prompt", "a red square", "--steps", "3", "--out", "s.png", cwd=tmp_path)
    assert Image.open(tmp_path / "s.png").size == (16, 16)
    cli(
        "sample",
        "--model",
        "run",
        "--prompt",
        "a red square",
        "--prompt",
        "a blue square",
        "--num-images",
        "2",
        "--steps",
        "2",
        "--out",
        "grid.png",
        cwd=tmp_path,
    )
    assert all((tmp_path / f"grid_{i}.png").is_file() for i in range(4))

    cli("eval", "--model", "run", "--samples-per-prompt", "1", "--steps", "2", "--per-kind", "2", cwd=tmp_path)
    report = json.loads((tmp_path / "run" / "eval" / "shapes_eval.json").read_text())
    assert set(report["categories"]) == set(CATEGORIES) and 0 <= report["overall"] <= 1
    assert (tmp_path / "run" / "eval" / "failures.png").is_file()  # a 4-step model fails most prompts

    # eval's held-out category defaults to the pairs the run's data never drew (the folder's world.json)
    def evaluated(*extra: str) -> dict[str, list[str]]:
        cli(
            "eval",
            "--model",
            "run",
            "--samples-per-prompt",
            "1",
            "--steps",
            "2",
            "--per-kind",
            "1",
            *extra,
            cwd=tmp_path,
        )
        records = json.loads((tmp_path / "run" / "eval" / "shapes_eval.json").read_text())["records"]
        return {c: [r["text"] for r in records if r["category"] == c] for c in {r["category"] for r in records}}

    assert "held_out" not in evaluated()  # a folder without a world.json: nothing held out
    (data / "world.json").write_text(json.dumps({"holdout": ["purple triangle"]}))
    texts = evaluated()
    assert texts["held_out"] and all("purple triangle" in t for t in texts["held_out"])
    assert not any("purple triangle" in t for c, ts in texts.items() if c != "held_out" for t in ts)
    assert "held_out" not in evaluated("--held-out", "")  # '' asks for none


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "--model", "nowhere", "--prompt", "x"], "does not exist"),
        (["sample", "--model", ".", "--prompt", "x"], "holds no model"),
        (["train", "--data", "./missing/folder", "--out", "r", "--steps", "1"], "missing/folder"),
        (["train", "--data", "d", "--out", "r"], "--steps, --epochs or --minutes"),
        (["train", "--data", "d", "--out", "r", "--steps", "0"], "positive integer"),
        (["train", "--data", "d", "--out", "r", "--steps", "1", "--backbone", "rnn"], "invalid choice"),
        (["train", "--data", "d", "--out", "r", "--steps", "1", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["train", "--data", "d", "--out", "r", "--steps", "1", "--snr-gamma", "-1"], "must be non-negative"),
        (["train", "--data", "d", "--out", "r", "--steps", "1", "--lr", "0"], "must be positive, got 0"),
        (["demo", "--lr", "0"], "must be positive, got 0"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    assert run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "cyclediffusion" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def build_noise_process(model: ModelOptions):
    return build_process(model.scheduler, **model.noise_options())


def test_ddpm_training_weights_the_loss_with_min_snr_5_unless_turned_off():
    t = torch.tensor([0, 500, 999])
    weighted = build_noise_process(ModelOptions())
    assert weighted.config.snr_gamma == 5.0
    snr = weighted.snr(t)
    torch.testing.assert_close(weighted.loss_weight(t), snr.clamp(max=5.0) / (snr + 1))  # v-prediction
    assert weighted.loss_weight(t)[0] < 0.01  # the nearly clean end no longer dominates the loss
    assert build_noise_process(ModelOptions(snr_gamma=0)).loss_weight(t) is None
    with pytest.raises(ValueError, match="snr_gamma"):
        build_noise_process(ModelOptions(snr_gamma=-1.0))


def test_ddp_first_step_loss_equals_single_process(tmp_path):
    data = write_folder(tmp_path / "data")
    common = ["--data", str(data), "--steps", "1", *TINY_FLAGS, "--accelerator", "cpu", "--ema-decay", "0"]
    common += EXACT_FLAGS
    cli("train", "--out", "single", "--batch-size", "8", *common, cwd=tmp_path)
    cli("train", "--out", "ddp", "--batch-size", "4", "--devices", "2", "--strategy", "ddp", *common, cwd=tmp_path)
    single = float(metrics(tmp_path / "single")[0]["train/loss"])
    ddp = float(metrics(tmp_path / "ddp")[0]["train/loss"])
    assert abs(single - ddp) < 1e-5, (single, ddp)
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_two_nodes_over_loopback_give_the_weights_of_one_process(tmp_path):
    """``--num-nodes 2``: two machines (here two processes, 1 device each, gloo on loopback, ranks from
    MASTER_ADDR / MASTER_PORT / NODE_RANK as torchrun or SLURM would set them) train as one process would."""
    import socket

    data = write_folder(tmp_path / "data")
    common = ["--data", str(data), "--steps", "2", *TINY_FLAGS, "--accelerator", "cpu", "--ema-decay", "0"]
    common += EXACT_FLAGS
    cli("train", "--out", "single", "--batch-size", "8", *common, cwd=tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env |= {"NODE_RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
        command = ["train", "--out", f"node{rank}", "--batch-size", "4", "--num-nodes", "2", "--strategy", "ddp"]
        procs.append(subprocess.Popen([sys.executable, "-m", "cyclediffusion", *command, *common], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    assert not (tmp_path / "node1" / "model").exists()  # only the global rank 0 exports
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "node0")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    losses = [float(row["train/loss"]) for row in metrics(tmp_path / "node0")]
    assert losses == pytest.approx([float(row["train/loss"]) for row in metrics(tmp_path / "single")], abs=1e-5)


def test_stop_when_ends_the_run_at_the_first_check_that_reaches_the_threshold(tmp_path):
    from cyclediffusion.training import VAEOptions, train_vae
    from cyclediffusion.training.callbacks import StopWhen

    data = DataOptions(data=str(write_folder(tmp_path / "data", n=8)), image_size=16)
    seen: list[int] = []

    def score(module: torch.nn.Module) -> float:  # the module's VAE, in eval mode
        assert not module.training and hasattr(module, "vae")
        seen.append(len(seen))
        return [0.2, 0.4, 0.9, 1.0][len(seen) - 1]

    stop = StopWhen(score, 0.8, every_n_steps=2, name="score")
    run = tiny_run(tmp_path / "vae", steps=20, ema_decay=None)
    train_vae(data, run, VAEOptions(size="tiny", downsample=4), callbacks=[stop])
    assert stop.scores == [(2, 0.2), (4, 0.4), (6, 0.9)]  # stopped at step 6 of 20
    rows = metrics(tmp_path / "vae")
    assert rows[-1]["step"] == 6 and [r["score"] for r in rows if "score" in r] == pytest.approx([0.2, 0.4, 0.9])
    floor = StopWhen(lambda module: 1.0, 0.8, every_n_steps=2, after_minutes=60)  # never before an hour
    train_vae(data, tiny_run(tmp_path / "floor", steps=6, ema_decay=None), VAEOptions(size="tiny"), [floor])
    assert floor.scores == [(2, 1.0), (4, 1.0), (6, 1.0)] and metrics(tmp_path / "floor")[-1]["step"] == 6
    with pytest.raises(ValueError, match="every_n_steps"):
        StopWhen(score, 0.8, every_n_steps=0)


def test_export_guide_writes_the_model_of_that_share_of_the_run(tmp_path):
    """``--export-guide 0.5`` of a 6-step run is the model a 3-step run ends with (constant LR, step-keyed batches);
    the final model has moved on from it, and carries it as its guide."""
    data = DataOptions(data=str(write_folder(tmp_path / "data")), image_size=16)
    options = dict(lr_schedule="constant", resume=False)
    train_text2image(data, tiny_run(tmp_path / "long", steps=6, export_guide=0.5, **options), tiny_model())
    train_text2image(data, tiny_run(tmp_path / "short", steps=3, **options), tiny_model())
    guide = load_file(tmp_path / "long" / "guide" / "denoiser" / "model.safetensors")
    short, final = final_weights(tmp_path / "short"), final_weights(tmp_path / "long")
    for key in guide:
        torch.testing.assert_close(guide[key], short[key], atol=1e-6, rtol=0, msg=key)
    assert any(not torch.equal(guide[k], final[k]) for k in guide)
    carried = load_file(tmp_path / "long" / "model" / "guide" / "denoiser" / "model.safetensors")
    assert carried.keys() == guide.keys() and all(torch.equal(carried[k], guide[k]) for k in guide)
    assert Text2ImagePipeline.from_pretrained(tmp_path / "long").guide is not None  # sampled with by default
    assert Text2ImagePipeline.from_pretrained(tmp_path / "short").guide is None
    with pytest.raises(ValueError, match="share of the run"):
        tiny_run(tmp_path / "x", steps=2, export_guide=1.0)
