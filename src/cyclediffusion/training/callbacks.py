"""Callbacks: EMA, resume checkpoints, exports, throughput, sample grids and the progress bar."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer, TQDMProgressBar, WeightAveraging

from ..images import make_grid, save_image

log = logging.getLogger("cyclediffusion")


def ema_decay_at(decay: float, num_averaged: int) -> float:
    """The EMA's effective decay after ``num_averaged`` updates: ``min(decay, (1 + n) / (10 + n))`` (warmup)."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


def ema_multi_avg_fn(decay: float):
    """EMA update of all tensors at once (one fused lerp per device and dtype): ``a += (1 - d) (current - a)``."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # AveragedModel groups the tensors by device and dtype; integer buffers (token position ids) are copied
        if averaged and not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        torch._foreach_lerp_(averaged, current, 1 - ema_decay_at(decay, int(num_averaged)))

    return update


class EMA(WeightAveraging):
    """Exponential moving average of the trained weights (Lightning's ``WeightAveraging``).

    The averaged copy is checkpointed with the live weights, used for sample grids and exports,
    and copied into the model when training ends.
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__(multi_avg_fn=ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    def averaged(self) -> L.LightningModule | None:
        return None if self._average_model is None else self._average_model.module


def inference_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA copy of the module when there is one, else the module itself."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA) and cb.averaged() is not None:
            return cb.averaged()
    return pl_module


class ResumeCheckpoint(L.Callback):
    """Keeps ``last.ckpt`` (model, EMA, optimiser, LR schedule, step) for resuming.

    Written atomically every ``every_n_steps`` optimiser steps, when training ends (before the EMA
    weights are swapped in) and when training stops on an exception or Ctrl-C.
    """

    def __init__(self, directory: str | Path, every_n_steps: int = 500) -> None:
        self.path = Path(directory) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._saved_at = -1

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_at:
            return
        tmp = self.path.with_suffix(".ckpt.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier()
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, ArithmeticError):  # a non-finite loss: the last checkpoint is the last good one
            return
        if trainer.global_step > 0 and trainer.world_size == 1:
            log.warning("training stopped (%s): saving a checkpoint to resume from", type(exception).__name__)
            self.save(trainer)


class Export(L.Callback):
    """Writes the inference model (EMA weights, safetensors) to ``directory`` every ``every_n_steps``.

    The folder is replaced atomically: a crash mid-write leaves the previous export intact.
    ``export_fn(module, path)`` does the writing.
    """

    def __init__(self, directory: str | Path, export_fn, every_n_steps: int = 0) -> None:
        self.directory = Path(directory)
        self.export_fn = export_fn
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            export_atomically(self.export_fn, inference_module(trainer, pl_module), self.directory)


def run_share(trainer: L.Trainer) -> tuple[float, float | None]:
    """``(progress, time_fraction)``: the share of the run done now, by steps of ``max_steps`` or by time of the
    budget (Lightning's timer, resumes included), whichever leads; and the time share alone (None untimed)."""
    progress = trainer.global_step / trainer.max_steps if trainer.max_steps > 0 else 0.0
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is None:
        return progress, None
    elapsed = timer.time_elapsed()
    fraction = elapsed / max(elapsed + remaining, 1e-9)
    return max(progress, fraction), fraction


class ExportAt(L.Callback):
    """Writes the inference model once, after the step that completes ``share`` of the run (:func:`run_share`): a
    weaker copy of the final model, for autoguidance. A fresh run first removes an older one; a resumed run that has
    passed ``share`` keeps the one it wrote."""

    def __init__(self, directory: str | Path, export_fn, share: float) -> None:
        self.directory, self.export_fn, self.share = Path(directory), export_fn, share
        self.done = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.done = trainer.global_step > 0 and self.directory.is_dir()
        if trainer.global_step == 0 and trainer.is_global_zero:
            shutil.rmtree(self.directory, ignore_errors=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.done and run_share(trainer)[0] >= self.share:
            self.done = True
            if trainer.is_global_zero:
                export_atomically(self.export_fn, inference_module(trainer, pl_module), self.directory)


class StopWhen(L.Callback):
    """Stops training once ``score_fn(model)`` reaches ``threshold``: early stopping on a score of the inference
    model (the EMA copy when there is one), computed every ``every_n_steps`` steps, logged as ``name`` and kept in
    :attr:`scores` as ``(step, score)``. It never stops a run before ``after_minutes`` of training (a floor: the run
    trains at least that long, and longer only while the score is short). Every rank computes it on the same
    weights, so all ranks stop together."""

    def __init__(
        self,
        score_fn,
        threshold: float,
        every_n_steps: int = 100,
        name: str = "stop_score",
        after_minutes: float = 0.0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.score_fn, self.threshold, self.every_n_steps, self.name = score_fn, threshold, every_n_steps, name
        self.after_minutes = after_minutes
        self.scores: list[tuple[int, float]] = []
        self._start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or (self.scores and self.scores[-1][0] == step):
            return
        model = inference_module(trainer, pl_module)
        training = model.training
        model.eval()
        score = float(self.score_fn(model))
        model.train(training)
        self.scores.append((step, score))
        pl_module.log(self.name, score)
        if score >= self.threshold and time.perf_counter() - self._start >= 60 * self.after_minutes:
            log.info("step %d: %s %.3f reached %.3f, stopping", step, self.name, score, self.threshold)
            trainer.should_stop = True


def export_atomically(export_fn, module: L.LightningModule, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_fn(module, tmp)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


class MetricsFile(L.Callback):
    """Appends the logged metrics to ``metrics.jsonl`` every ``every_n_steps`` (rank 0).

    Append-only, so a resumed run keeps its history (steps repeated after a crash appear twice; the
    later line wins, see :func:`read_metrics`). A metric that was not logged again since the last line (a term
    that is switched off, or not due) is left out rather than repeated.
    """

    def __init__(self, path: str | Path, every_n_steps: int = 25) -> None:
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._start = time.perf_counter()
        self._written = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == 1:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module)  # the last step, whatever the logging interval

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._written:
            return
        self._written = step
        row = {"step": step, "time": round(time.perf_counter() - self._start, 3)}
        logged = getattr(pl_module, "logged_names", None)  # what was logged since the last line (StepModule)
        metrics = {k: v for k, v in trainer.callback_metrics.items() if logged is None or k in logged}
        row.update({k: float(v) for k, v in metrics.items() if v.numel() == 1})
        if logged is not None:
            logged.clear()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a ``metrics.jsonl``, one per step (the last line written for a step wins), by step."""
    rows: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


class Throughput(L.Callback):
    """Logs images per second: images of one micro-batch (all ranks) over its wall time."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            pl_module.log("train/images_per_s", self.global_batch / (now - self._last), prog_bar=True)
        self._last = now


class SampleGrid(L.Callback):
    """Every ``every_n_steps``, draws the fixed prompts with the EMA weights into TensorBoard and a PNG (at the
    model's default guidance unless ``guidance_scale`` is given)."""

    def __init__(
        self,
        prompts: list[str],
        directory: str | Path,
        every_n_steps: int,
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        self.prompts = prompts
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.draw(trainer, pl_module, step)

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path:
        module = inference_module(trainer, pl_module)
        was_training = module.training
        module.eval()
        pipe = module.to_pipeline()
        images = pipe(
            self.prompts,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[torch.Generator().manual_seed(self.seed + i) for i in range(len(self.prompts))],
            output_type="pt",
        ).images
        module.train(was_training)
        grid = make_grid(images, nrow=min(8, len(images)))
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("samples", grid, step)
        path = self.directory / f"step_{step:07d}.png"
        save_image(grid, path)
        return path


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) of a duration."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunProgressBar(TQDMProgressBar):
    """The training bar measured against the run's length, never Lightning's epochs: seconds elapsed of the
    ``minutes`` budget when there is one (with the steps done beside them, and ``steps`` as a cap), else steps
    done of ``steps``. Its remaining time is then the budget's, not a guess from the step cap."""

    def __init__(self, steps: int | None, minutes: float | None) -> None:
        super().__init__()
        self.steps = steps
        self.budget = minutes * 60 if minutes else None
        self._start = time.perf_counter()

    def elapsed(self, trainer: L.Trainer) -> float:
        """Training time so far (a resumed run counts the time before the interruption, as its budget does)."""
        for cb in trainer.callbacks:
            if isinstance(cb, Timer):
                return cb.time_elapsed("train")
        return time.perf_counter() - self._start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if self.budget:
            bar.reset(total=int(self.budget))
            bar.unit = "s"
        else:
            bar.reset(total=self.steps)
            bar.n = trainer.global_step
            bar.unit = "step"
        bar.set_description("train")
        self.show(trainer, None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step % self.refresh_rate == 0 or trainer.global_step == self.steps:
            self.show(trainer, pl_module)

    def show(self, trainer: L.Trainer, pl_module: L.LightningModule | None) -> None:
        bar = self.train_progress_bar
        elapsed = self.elapsed(trainer)
        bar.n = min(int(elapsed), bar.total) if self.budget else trainer.global_step
        postfix = self.get_metrics(trainer, pl_module) if pl_module is not None else {}
        postfix.pop("v_num", None)
        if self.budget:
            steps = f"{trainer.global_step}" + (f"/{self.steps}" if self.steps else "")
            postfix = {"step": steps, **postfix, "time": f"{clock(elapsed)} of {clock(self.budget)}"}
        bar.set_postfix(postfix, refresh=True)
