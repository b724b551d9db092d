"""Seconds per CycleDiffusion edit: ours against diffusers' ``CycleDiffusionPipeline`` on the same components.

    python benchmarks/edit_speed.py            # tiny Stable Diffusion components, 64 and 128 px, 50 steps
    python benchmarks/edit_speed.py --quick    # 32 px, 4 steps, one repeat: seconds
    python benchmarks/edit_speed.py --compile  # also ours with the denoiser compiled (pipe.compile())

Both pipelines get the same tiny diffusers / transformers components (``tiny_sd.py``), image, prompts and seeds:
strength 0.8, guidance 7.5, source guidance 1, eta 0.1, fp32. With source guidance 1 ours skips the source
chain's unconditional pass (3 U-Net rows per step instead of diffusers' 4); the outputs agree to 1e-4 (the tests).
On a GPU, and on a CPU with native bf16 (AVX512_BF16 or AMX), a bf16-autocast column of ours is added, with its
speed-up against diffusers' fp32. ``--compile`` adds ours with ``torch.compile`` of the denoiser (fp32, and bf16
where that column runs); its warm-up call compiles, and the seconds that took are printed beside it. Each figure is
the median of ``--repeats`` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import machine_line, sync, versions_line
from PIL import Image
from tiny_sd import tiny_stable_diffusion

from cyclediffusion import CycleDiffusionPipeline
from cyclediffusion.precision import choose_dtype


def seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="64,128", help="image sizes in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time ours with the denoiser compiled")
    args = parser.parse_args(argv)
    sizes = [32] if args.quick else [int(s) for s in args.sizes.split(",")]
    steps, repeats = (4, 1) if args.quick else (args.steps, args.repeats)

    import diffusers

    with tempfile.TemporaryDirectory() as tmp:
        components = tiny_stable_diffusion(Path(tmp), layers_per_block=2)
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.CycleDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    theirs.set_progress_bar_config(disable=True)
    ours = CycleDiffusionPipeline.from_diffusers(**components)
    compiled = CycleDiffusionPipeline.from_diffusers(**components).compile() if args.compile else None
    assert compiled is None or compiled.denoiser is not ours.denoiser  # the eager column stays eager
    kwargs = dict(strength=0.8, num_inference_steps=steps, guidance_scale=7.5, source_guidance_scale=1.0, eta=0.1)

    print(machine_line(args.device))
    print(versions_line(("cyclediffusion", "diffusers", "transformers")))
    print(f"settings: {steps} steps, strength 0.8, guidance 7.5, source guidance 1, eta 0.1, median of {repeats}")
    bf16 = choose_dtype("auto", args.device)[0] == torch.bfloat16  # the rule of `edit --dtype auto`
    print(f"{'size':>5} {'diffusers s':>12} {'ours s':>8} {'speed-up':>9} {'ours bf16 s':>12} {'bf16 speed-up':>14}")
    rows = []
    for size in sizes:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))

        def run(pipe, autocast: bool = False, image=image):
            def call():
                with warnings.catch_warnings(), torch.autocast(args.device, torch.bfloat16, enabled=autocast):
                    warnings.simplefilter("ignore")
                    generator = torch.Generator().manual_seed(0)
                    return pipe(
                        prompt="a red circle",
                        source_prompt="a blue circle",
                        image=image,
                        generator=generator,
                        output_type="np",
                        **kwargs,
                    ).images

            return call

        t_theirs = seconds(run(theirs), repeats, args.device)
        t_ours = seconds(run(ours), repeats, args.device)
        t_bf16 = seconds(run(ours, autocast=True), repeats, args.device) if bf16 else None
        if compiled is not None:
            start = time.perf_counter()
            compiled_images = run(compiled)()  # compiles at this size
            compile_s = time.perf_counter() - start
            max_diff = float(np.abs(np.asarray(compiled_images) - np.asarray(run(ours)())).max())
            t_compiled = seconds(run(compiled), repeats, args.device)
            t_compiled_bf16 = seconds(run(compiled, autocast=True), repeats, args.device) if bf16 else None
        row = {
            "size": size,
            "diffusers_s": t_theirs,
            "ours_s": t_ours,
            "speedup": t_theirs / t_ours,
            "ours_bf16_s": t_bf16,
        }
        rows.append(row)
        tail = f"{t_bf16:12.3f} {t_theirs / t_bf16:13.2f}x" if t_bf16 is not None else f"{'-':>12} {'-':>14}"
        print(f"{size:>5} {t_theirs:12.3f} {t_ours:8.3f} {t_theirs / t_ours:8.2f}x {tail}")
        if compiled is not None:
            row.update(compile_s=compile_s, compiled_max_diff=max_diff, ours_compiled_s=t_compiled,
                       ours_compiled_bf16_s=t_compiled_bf16)  # fmt: skip
            line = (f"      compiled (first call {compile_s:.0f} s, output within {max_diff:.1e} of eager): "
                    f"{t_compiled:.3f} s, {t_theirs / t_compiled:.2f}x")  # fmt: skip
            if t_compiled_bf16 is not None:
                line += f"; bf16 {t_compiled_bf16:.3f} s, {t_theirs / t_compiled_bf16:.2f}x"
            print(line)
    return rows


if __name__ == "__main__":
    main()
