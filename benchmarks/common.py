"""Helpers the benchmark scripts share: the machine and library versions they print, device sync, memory."""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(device: str) -> str:
    """One line: CPU, torch threads, device (with the GPU's name)."""
    gpu = f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return f"machine: {cpu_name()}, {torch.get_num_threads()} threads, device {device}{gpu}"


def versions_line(packages: tuple[str, ...] = ("cyclediffusion", "lightning", "diffusers")) -> str:
    """One line: Python, torch (and its CUDA) and the installed ``packages`` with their versions."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts[-1] += f" (CUDA {torch.version.cuda})"
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{name} {metadata.version(name)}")
    return "versions: " + ", ".join(parts)


def sync(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock timings are complete."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (``ru_maxrss``: a high-water mark, never lowered), MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def training_device() -> tuple[str, str]:
    """``(device, Lightning precision)``: the GPU when there is one, and the precision ``--precision auto`` (the demo's)
    picks there: bf16-mixed where the device computes bf16 natively, fp32 elsewhere."""
    from cyclediffusion.precision import choose_precision

    gpu = torch.cuda.is_available()
    return ("cuda" if gpu else "cpu"), choose_precision("auto", "gpu" if gpu else "cpu")[0]
