"""Training throughput and MFU: our U-Net and DiT against diffusers' UNet2DConditionModel, in one run.

    python benchmarks/train_throughput.py            # demo size (8x8x4 latents) and a larger size (16x16x4)
    python benchmarks/train_throughput.py --quick    # a few steps, for the test that keeps this script working

For each model and precision it prints images/s of a full training step (forward, backward, AdamW), the FLOPs
of that step (torch.utils.flop_counter, with a formula for CPU attention, which torch counts as 0) and the
model FLOP utilisation against a matmul peak measured on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import machine_line, sync, versions_line
from torch.utils.flop_counter import FlopCounterMode

from cyclediffusion.models import UNet, UNetConfig
from cyclediffusion.recipes import UNET_SIZES, build_denoiser

CONTEXT, TOKENS = 128, 16


def attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """2 matmuls of (s_q x d) by (d x s_k) and (s_q x s_k) by (s_k x d_v), per batch and head."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (d + d_v)


def attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return 2 * attention_flops(query_shape, key_shape, value_shape)


def flop_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", attention_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", attention_backward_flops),
    ):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = fn
    return mapping


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 1.0) -> float:
    """Best GFLOP/s of an n x n and an n/2 x n/2 matmul, after a warm-up.

    Without the warm-up, the first second of a process on a 2-core EPYC once read 99 GFLOP/s for fp32 where the same
    matmul runs at 190: every MFU of that run came out above 100%."""
    best = 0.0
    for size in (n // 2, n):
        a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
        warm = time.perf_counter() + seconds / 4
        while time.perf_counter() < warm:
            a @ b
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def ours_unet(size: int, spec: dict) -> torch.nn.Module:
    return UNet(
        UNetConfig(in_channels=4, out_channels=4, sample_size=size, context_dim=CONTEXT, pooled_dim=CONTEXT, **spec)
    )


def ours_dit(size: int, name: str) -> torch.nn.Module:
    """The DiT that ``train --backbone dit --model-size NAME`` builds (the recipe's exact GELU included)."""
    return build_denoiser("dit", name, in_channels=4, sample_size=size, context_dim=CONTEXT)


def diffusers_unet(size: int, channels: tuple[int, ...], layers: int) -> torch.nn.Module | None:
    """diffusers' UNet2DConditionModel with our U-Net's channels, depth and attention levels."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1)
    up = ["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"]
    net = UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=CONTEXT,
        attention_head_dim=32,
        norm_num_groups=32,
    )

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, t, context, pooled):
            return self.net(x, t, encoder_hidden_states=context).sample

    return Wrapped()


def measure(
    model: torch.nn.Module, size: int, batch: int, steps: int, precision: str, device: str, count_flops: bool = True
) -> tuple[list[float], int]:
    """(seconds of each of ``steps`` timed training steps, FLOPs per step, or 0 uncounted) of forward + backward +
    AdamW, after one untimed step."""
    model = model.to(device).train()
    # fused AdamW, as training uses on CPUs and CUDA (the same optimiser for every model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.split(":")[0] in ("cpu", "cuda"))
    x = torch.randn(batch, 4, size, size, device=device)
    t = torch.rand(batch, device=device) * 1000
    context = torch.randn(batch, TOKENS, CONTEXT, device=device)
    pooled = torch.randn(batch, CONTEXT, device=device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=precision == "bf16"):
            loss = model(x, t, context, pooled).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = 0
    if count_flops:
        counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
        with counter:
            step()
        flops = counter.get_total_flops()
    step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, flops


def rows(sizes: list[str]) -> list[tuple[str, int, Callable[[], torch.nn.Module | None]]]:
    """The models of the named sizes: demo (8x8 latents), large (16x16), gpu (32x32: U-Net base, DiT-B/2)."""
    known = {
        "demo": (8, UNET_SIZES["small"], "tiny"),
        "large": (16, UNET_SIZES["base"], "DiT-S/2"),
        "gpu": (32, UNET_SIZES["base"], "DiT-B/2"),
    }
    unknown = set(sizes) - set(known)
    if unknown:
        raise SystemExit(f"unknown size {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    out = []
    for label in sizes:
        size, unet_spec, dit_spec = known[label]
        out.append((f"ours U-Net ({label})", size, lambda s=size, u=unet_spec: ours_unet(s, u)))
        out.append(
            (
                f"diffusers UNet2DConditionModel ({label})",
                size,
                lambda s=size, u=unet_spec: diffusers_unet(s, u["block_channels"], u["layers_per_block"]),
            )
        )
        out.append((f"ours DiT ({label})", size, lambda s=size, d=dit_spec: ours_dit(s, d)))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two timed steps, demo size only")
    parser.add_argument("--sizes", default="demo,large", help="comma-separated: demo, large, gpu (32x32, DiT-B/2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds in which the rows of a size take turns")
    parser.add_argument("--precision", default="32,bf16", help="comma-separated: 32, bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    steps, rounds = (2, 1) if args.quick else (args.steps, args.rounds)
    batch = 8 if args.quick else args.batch_size
    precisions = args.precision.split(",")
    torch.manual_seed(0)

    peaks = {
        p: matmul_peak(torch.bfloat16 if p == "bf16" else torch.float32, args.device, 512 if args.quick else 2048)
        for p in precisions
    }
    print(machine_line(args.device))
    print(versions_line())
    print("matmul peak: " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()))
    print(f"batch {batch}, {rounds} round(s) of {steps} timed steps per row, taking turns; images/s at the median step")
    print("training step = forward + backward + AdamW\n")
    print("| model | latent | params (M) | precision | images/s | GFLOP/image | GFLOP/s | MFU |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    speed: dict[tuple[str, str], float] = {}
    results = []
    for label in ["demo"] if args.quick else args.sizes.split(","):
        built = [(name, size, build()) for name, size, build in rows([label])]
        times: dict[tuple[str, str], list[float]] = {}
        flops: dict[tuple[str, str], int] = {}
        for round_ in range(rounds):  # the rows of a size take turns, so a slower spell of the host hits them all
            for name, size, model in built:
                for precision in precisions:
                    if model is not None:
                        spent, counted = measure(model, size, batch, steps, precision, args.device, round_ == 0)
                        times.setdefault((name, precision), []).extend(spent)
                        flops.setdefault((name, precision), counted)
        for name, size, model in built:
            if model is None:
                print(f"| {name} | skipped (diffusers not installed) | | | | | | |")
                continue
            params = sum(p.numel() for p in model.parameters()) / 1e6
            for precision in precisions:
                ips = batch / statistics.median(times[name, precision])  # one slow step of a busy host does not count
                per_image = flops[name, precision] / batch / 1e9
                achieved = ips * per_image
                speed[(name, precision)] = ips
                results.append({"model": name, "latent": size, "params_m": params, "precision": precision,
                                "images_per_s": ips, "gflop_per_image": per_image,
                                "mfu": achieved / peaks[precision], "peak_gflops": peaks[precision]})  # fmt: skip
                print(
                    f"| {name} | {size}x{size}x4 | {params:.2f} | {precision} | {ips:.1f} | {per_image:.3f} "
                    f"| {achieved:.1f} | {achieved / peaks[precision]:.1%} |"
                )
    print()
    for (name, precision), ips in speed.items():
        if name.startswith("ours U-Net"):
            label = name[len("ours U-Net ") :]
            theirs = speed.get((f"diffusers UNet2DConditionModel {label}", precision))
            if theirs:
                print(f"U-Net speed ratio ours / diffusers {label}, {precision}: {ips / theirs:.2f}x")
    for label in ("demo", "large", "gpu"):  # the speed issue's figures: our bf16 against diffusers' fp32, DiT bf16/fp32
        ours, theirs = (
            speed.get((f"ours U-Net ({label})", "bf16")),
            speed.get((f"diffusers UNet2DConditionModel ({label})", "32")),
        )
        if ours and theirs:
            print(f"ours U-Net bf16 / diffusers fp32 ({label}): {ours / theirs:.2f}x")
        dit_bf16, dit_32 = speed.get((f"ours DiT ({label})", "bf16")), speed.get((f"ours DiT ({label})", "32"))
        if dit_bf16 and dit_32:
            print(f"ours DiT bf16 / fp32 ({label}): {dit_bf16 / dit_32:.2f}x")
    return results


if __name__ == "__main__":
    main()
