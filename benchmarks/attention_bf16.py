"""Attention forward + backward on the CPU: torch's kernel in fp32, the same in bf16, torch's fp32 kernel on casts of
bf16 inputs, and ours (which attends through explicit bf16 matmuls and softmax when it trains under bf16 autocast,
``models/layers.py::scaled_dot_product_attention``), side by side in one run.

    python benchmarks/attention_bf16.py                     # the demo DiT's shapes and a larger one
    python benchmarks/attention_bf16.py --repeats 50
    python benchmarks/attention_bf16.py --quick             # one shape, one repeat (the tests)

Shapes are (batch, heads, query tokens, key tokens, head dim): the demo DiT's self-attention (64 patches) and
cross-attention (64 patches x 16 text tokens) at batch 64, and a 256-token self-attention (the large DiT).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import machine_line, versions_line

from cyclediffusion.models.layers import scaled_dot_product_attention

SHAPES = {
    "demo DiT self-attention": (64, 4, 64, 64, 32),
    "demo DiT cross-attention": (64, 4, 64, 16, 32),
    "large DiT self-attention": (16, 8, 256, 256, 64),
}


def timed(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of ``fn(q, k, v)`` forward + backward under bf16 autocast (q, k, v in their dtype)."""
    times = []
    for i in range(repeats + 3):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=q.dtype == torch.bfloat16):
            out = fn(q, k, v)
        out.float().sum().backward()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def fp32_on_casts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fp32 kernel on fp32 casts of bf16 inputs, the result cast back (what training in bf16 did before)."""
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="the demo's cross-attention once (for the tests)")
    args = parser.parse_args(argv)
    shapes = {k: v for k, v in SHAPES.items() if "cross" in k} if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    print(machine_line("cpu"))
    print(versions_line(("cyclediffusion",)))
    print(
        "| shape (B, heads, Nq, Nk, d) | torch fp32 ms | torch bf16 ms | torch fp32 on bf16 casts ms | ours bf16 ms "
        "| speed-up, ours against torch bf16 | against the casts |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (b, h, nq, nk, d) in shapes.items():
        g = torch.Generator().manual_seed(0)
        base = [torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk)]
        fp32 = [t.clone().requires_grad_() for t in base]
        bf16 = [t.bfloat16().requires_grad_() for t in base]
        torch_fp32 = timed(F.scaled_dot_product_attention, *fp32, repeats)
        torch_bf16 = timed(F.scaled_dot_product_attention, *bf16, repeats)
        casts = timed(fp32_on_casts, *bf16, repeats)
        ours = timed(scaled_dot_product_attention, *bf16, repeats)
        print(
            f"| {name} {(b, h, nq, nk, d)} | {torch_fp32:.2f} | {torch_bf16:.2f} | {casts:.2f} | {ours:.2f} | "
            f"{torch_bf16 / ours:.2f}x | {casts / ours:.2f}x |"
        )


if __name__ == "__main__":
    main()
