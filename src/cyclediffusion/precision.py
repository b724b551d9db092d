"""``auto`` precision: bf16 where the hardware computes it natively, fp32 elsewhere, and the reason in words.

bf16 pays on CUDA devices that support it and on CPUs with native bf16 instructions (AVX512_BF16 or AMX), where
bf16 matmuls run about 2.8x fp32; on CPUs without them (AVX2 only) torch emulates bf16 and it runs 10-20x slower,
so fp32 is chosen there. Training asks for a Lightning precision, sampling and editing for a torch dtype.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed", "32-true")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and which instruction set says so (torch's own probes)."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True, name
    return False, torch.backends.cpu.get_cpu_capability()


def uses_cuda(accelerator: str = "auto") -> bool:
    """Whether a run with this Lightning ``accelerator`` lands on a CUDA device."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def choose_precision(requested: str, accelerator: str = "auto") -> tuple[str, str]:
    """The Lightning precision for ``requested`` (``auto`` resolved) and why."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested, "asked for"
    if uses_cuda(accelerator):
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"auto: {torch.cuda.get_device_name()} computes bf16"
        return "32", f"auto: {torch.cuda.get_device_name()} has no bf16"
    native, what = cpu_has_native_bf16()
    if native:
        return "bf16-mixed", f"auto: this CPU has native bf16 ({what})"
    return "32", f"auto: this CPU has no native bf16 ({what} only; bf16 would be emulated and slower)"


def choose_dtype(requested: str, device: str | torch.device) -> tuple[torch.dtype, str]:
    """The torch dtype of sampling or editing on ``device`` for ``requested`` (``auto`` or a name of
    :data:`DTYPES`) and why."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; choose from auto, {', '.join(DTYPES)}")
        return DTYPES[requested], "asked for"
    if torch.device(device).type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU computes bf16"
        return torch.float32, "auto: the GPU has no bf16"
    native, what = cpu_has_native_bf16()
    if native:
        return torch.bfloat16, f"auto: this CPU has native bf16 ({what})"
    return torch.float32, f"auto: this CPU has no native bf16 ({what} only)"


def cast_pipeline(pipe: Any, requested: str = "auto") -> Any:
    """``pipe`` cast to the dtype :func:`choose_dtype` picks for its device (``auto``: bf16 where the device
    computes it natively); logs the choice and why."""
    dtype, why = choose_dtype(requested, pipe.device)
    logging.getLogger("cyclediffusion").info("dtype %s (%s)", str(dtype).removeprefix("torch."), why)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
