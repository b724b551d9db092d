"""What a training step of the demo's DiT spends outside its matrix products, before and after, in one run.

    python benchmarks/step_overhead.py            # the demo's DiT tiny at batch 64, 8x8x4 latents
    python benchmarks/step_overhead.py --quick    # a few repeats, for the test that keeps this script working

Three parts of a step, each timed both ways on the same tensors (median of the repeats):

- the optimiser: AdamW's default per-tensor loop on a CPU against the fused kernel that training now uses;
- Muon (``--optimizer muon``) on the DiT's hidden matrices: ``torch.optim.Muon``, which orthogonalises one matrix
  after another and always in bf16, against :class:`~cyclediffusion.training.optimizers.BatchedMuon` (same maths,
  one batched Newton-Schulz iteration per shape, in bf16 only where the CPU computes it natively: fp32 on AVX2);
- the EMA update: one lerp per tensor (the old ``avg_fn``) against one fused ``_foreach_lerp_`` (``multi_avg_fn``);
- the DiT's MLP activation: forward + backward + AdamW of the whole DiT with the tanh GELU (the DiT paper's, and the
  class default) against the exact GELU that the recipes build, under the precision ``--precision auto`` picks here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import machine_line, versions_line

from cyclediffusion.models import DiT
from cyclediffusion.precision import choose_dtype, choose_precision
from cyclediffusion.recipes import build_denoiser
from cyclediffusion.training.optimizers import BatchedMuon, muon_matrices

CONTEXT, TOKENS = 128, 16


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def demo_dit(gelu: str) -> DiT:
    torch.manual_seed(0)
    return build_denoiser("dit", "tiny", in_channels=4, sample_size=8, context_dim=CONTEXT, gelu_approximate=gelu)


def optimiser_ms(repeats: int) -> tuple[float, float]:
    params = list(demo_dit("none").parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    loop = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    return median_ms(loop.step, repeats), median_ms(fused.step, repeats)


def muon_ms(repeats: int) -> tuple[float, float]:
    matrices = muon_matrices(demo_dit("none"))
    for p in matrices:
        p.grad = torch.randn_like(p)
    options = dict(lr=1e-3, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    per_matrix, batched = torch.optim.Muon(matrices, **options), BatchedMuon(matrices, **options)
    return median_ms(per_matrix.step, repeats), median_ms(batched.step, repeats)


def ema_ms(repeats: int) -> tuple[float, float]:
    current = [p.detach() for p in demo_dit("none").parameters()]
    averaged = [c.clone() for c in current]

    def per_tensor() -> None:
        for a, c in zip(averaged, current):
            a.copy_(a + (c - a) * 0.01)

    return median_ms(per_tensor, repeats), median_ms(lambda: torch._foreach_lerp_(averaged, current, 0.01), repeats)


def dit_step_ms(gelu: str, batch: int, bf16: bool, repeats: int) -> float:
    model = demo_dit(gelu).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 4, 8, 8, generator=g), torch.rand(batch, generator=g) * 1000
    context, pooled = torch.randn(batch, TOKENS, CONTEXT, generator=g), torch.randn(batch, CONTEXT, generator=g)
    mask = torch.ones(batch, TOKENS, dtype=torch.bool)
    mask[:, 10:] = False

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, context, pooled, mask)
        (out.float() - x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_ms(step, repeats)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few repeats")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 30
    precision, why = choose_precision("auto", "cpu")
    bf16 = precision.startswith("bf16")
    print(machine_line("cpu"))
    print(versions_line(("cyclediffusion", "lightning")))
    ns_dtype = str(choose_dtype("auto", "cpu")[0]).removeprefix("torch.")
    print(f"precision {precision} ({why}); DiT tiny, batch {args.batch}, median of {repeats}")
    print(f"Newton-Schulz iterations: torch's Muon in bfloat16, BatchedMuon in {ns_dtype}\n")
    figures = {}
    figures["adamw_loop_ms"], figures["adamw_fused_ms"] = optimiser_ms(repeats)
    figures["muon_torch_ms"], figures["muon_batched_ms"] = muon_ms(repeats)
    figures["ema_per_tensor_ms"], figures["ema_foreach_ms"] = ema_ms(repeats)
    figures["dit_step_tanh_gelu_ms"] = dit_step_ms("tanh", args.batch, bf16, repeats)
    figures["dit_step_exact_gelu_ms"] = dit_step_ms("none", args.batch, bf16, repeats)
    print("| part of a step | before (ms) | now (ms) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for label, before, now in (
        ("AdamW: per-tensor loop -> fused", "adamw_loop_ms", "adamw_fused_ms"),
        ("Muon: torch's per-matrix loop -> batched by shape", "muon_torch_ms", "muon_batched_ms"),
        ("EMA: per-tensor -> one foreach lerp", "ema_per_tensor_ms", "ema_foreach_ms"),
        ("DiT step (fwd + bwd + AdamW): tanh -> exact GELU", "dit_step_tanh_gelu_ms", "dit_step_exact_gelu_ms"),
    ):
        b, n = figures[before], figures[now]
        print(f"| {label} | {b:.2f} | {n:.2f} | {b / n:.2f}x |")
    return figures


if __name__ == "__main__":
    main()
