"""Sampling-time variants screened on trained models, paired: every variant samples each model from the same seeds.

Variants (a one-off patch of the guided prediction, not part of the library):

- ``plain``: the pipeline's own sampling (classifier-free guidance, and autoguidance where a guide is given).
- ``shiftS``: the flow time grid pushed towards the noisy end by ``S`` (``FlowConfig.shift``; 1 is ``plain``).
- ``cfgstar``: CFG-Zero*'s optimised scale (Fan et al. 2025): the unconditional prediction is scaled by
  ``s = <cond, uncond> / |uncond|^2`` (per image) before guidance, ``s uncond + w (cond - s uncond)``.
- ``cfgstarK``: the same, with the first ``K`` sampler steps' prediction set to zero (CFG-Zero*'s zero-init).
- ``intervalA-B``: guidance (classifier-free, and autoguidance where a guide is given) only while the flow time is in
  ``[A, B]`` (1 is pure noise), the conditional prediction alone elsewhere (Kynkäänniemi et al. 2024, "Applying
  guidance in a limited interval").
- ``apgE``: adaptive projected guidance (Sadat et al. 2024): each guidance difference (conditional minus
  unconditional, and minus the guide's where there is one) is taken in clean-image space and split into its part
  along the conditional clean-image estimate and the rest; the parallel part is weighted by ``E`` (0 drops it,
  1 is ``plain``, above 1 strengthens it). The parallel part scales what the estimate already holds.

Model ``i`` of ``--models`` samples with seeds ``s + i`` for each ``s`` of ``--sampling-seeds``; the table gives each
variant's mean and its paired difference from ``plain`` (mean ± std over models x seeds).

    python benchmarks/guidance_screen.py --demo runs/demo --out runs/guidance_screen \\
        --models runs/lr_avx2/dit_muon2_s0/model,runs/lr_avx2/dit_muon2_s1/model,runs/lr_avx2/dit_muon2_s2/model \\
        --variants plain,shift2,shift3,cfgstar,cfgstar1,cfgstar2 --sampling-seeds 0,100
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch
from common import machine_line, training_device, versions_line
from composition_ablation import demo_holdout, quick_demo, variant_model

from cyclediffusion.demo import IMAGE_SIZE
from cyclediffusion.eval import build_suite, evaluate_pipeline
from cyclediffusion.pipelines import Text2ImagePipeline
from cyclediffusion.pipelines.base import Guidance, SelfCondition
from cyclediffusion.training import DataOptions, RunOptions, train_text2image

NUMBER = r"\d+(?:\.\d+)?"
VARIANT = re.compile(
    rf"plain|shift(?P<shift>{NUMBER})|cfgstar(?P<zero>\d*)|interval(?P<low>{NUMBER})-(?P<high>{NUMBER})"
    rf"|apg(?P<eta>{NUMBER})"
)


def optimised_scale_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero*'s guided prediction: ``s uncond + scale (cond - s uncond)``, ``s`` the least-squares fit of
    ``cond`` by ``uncond`` per image."""
    dims = tuple(range(1, uncond.ndim))
    s = (cond * uncond).sum(dims, keepdim=True) / (uncond * uncond).sum(dims, keepdim=True).clamp_min(1e-12)
    return s * uncond + scale * (cond - s * uncond)


def apply_variant(pipe: Text2ImagePipeline, variant: str, base_shift: float | None = None) -> None:
    """Set ``pipe`` to sample as ``variant``, undoing any earlier one (``base_shift``: the model's own time-grid
    shift, restored by the other variants; flow models only)."""
    if (match := VARIANT.fullmatch(variant)) is None:
        raise ValueError(f"unknown variant {variant!r}")
    for name in ("guided_model_fn", "autoguided_model_fn"):
        pipe.__dict__.pop(name, None)  # back to the class's methods
    shift = match["shift"]
    if shift and not hasattr(pipe.noise_process.config, "shift"):
        raise ValueError(f"{variant}: only flow-matching models have a time-grid shift")
    if shift or base_shift is not None:
        pipe.noise_process.config.shift = float(shift) if shift else base_shift
    if match["low"] is not None:
        return apply_interval(pipe, float(match["low"]), float(match["high"]))
    if match["eta"] is not None:
        return apply_projected(pipe, float(match["eta"]))
    if match["zero"] is None:
        return
    zero_steps = int(match["zero"] or 0)

    def star(calls: list[int], uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        calls[0] += 1
        guided = optimised_scale_guidance(uncond, cond, scale)
        return torch.zeros_like(guided) if calls[0] <= zero_steps else guided

    def guided_model_fn(cond, uncond, scale):
        state, calls = SelfCondition(), [0]

        def fn(x, t):
            u, c = pipe.guided_predictions([x, x], t, [Guidance(uncond), Guidance(cond)], state)
            return star(calls, u, c, scale)

        return fn

    def autoguided_model_fn(guidance, guide, guide_cond, guide_scale):
        guide_fn, state, calls = guide.guided_model_fn(guide_cond, None, 1.0), SelfCondition(), [0]

        def fn(x, t):
            u, c = pipe.guided_predictions([x, x], t, [Guidance(guidance.uncond), Guidance(guidance.cond)], state)
            return star(calls, u, c, guidance.scale) + guide_scale * (c - guide_fn(x, t))

        return fn

    pipe.guided_model_fn, pipe.autoguided_model_fn = guided_model_fn, autoguided_model_fn


def apply_interval(pipe: Text2ImagePipeline, low: float, high: float) -> None:
    """Guide ``pipe`` only while the path time lies in ``[low, high]``; elsewhere sample the conditional prediction."""

    def inside(t: torch.Tensor) -> bool:
        return low <= float(pipe.noise_process.path_time(t[:1])) <= high

    def guided_model_fn(cond, uncond, scale):
        guided = type(pipe).guided_model_fn(pipe, cond, uncond, scale)
        plain = type(pipe).guided_model_fn(pipe, cond, None, 1.0)
        return lambda x, t: guided(x, t) if inside(t) else plain(x, t)

    def autoguided_model_fn(guidance, guide, guide_cond, guide_scale):
        guided = type(pipe).autoguided_model_fn(pipe, guidance, guide, guide_cond, guide_scale)
        plain = type(pipe).guided_model_fn(pipe, guidance.cond, None, 1.0)
        return lambda x, t: guided(x, t) if inside(t) else plain(x, t)

    pipe.guided_model_fn, pipe.autoguided_model_fn = guided_model_fn, autoguided_model_fn


def projected_difference(x0_cond: torch.Tensor, diff: torch.Tensor, eta: float) -> torch.Tensor:
    """``diff`` with its component along ``x0_cond`` (per image) weighted by ``eta``."""
    dims = tuple(range(1, diff.ndim))
    along = (diff * x0_cond).sum(dims, keepdim=True) / (x0_cond * x0_cond).sum(dims, keepdim=True).clamp_min(1e-12)
    parallel = along * x0_cond
    return diff - parallel + eta * parallel


def apply_projected(pipe: Text2ImagePipeline, eta: float) -> None:
    """Adaptive projected guidance with parallel weight ``eta``: each difference split along the conditional x0."""
    process = pipe.noise_process

    def guided(x, t, cond, others):
        # cond + sum_k w_k (cond - other_k): at fixed x_t a prediction is affine in x0 with one scale per row (flow:
        # x0 = x - t v), so a difference of predictions is that scale times the difference of x0 estimates, and the
        # projection commutes with it
        x0_cond = process.to_x0_eps(cond, x, process.path_time(t))[0]
        return cond + sum(weight * projected_difference(x0_cond, cond - other, eta) for other, weight in others)

    def guided_model_fn(cond, uncond, scale):
        if uncond is None or scale == 1:
            return type(pipe).guided_model_fn(pipe, cond, uncond, scale)
        state = SelfCondition()

        def fn(x, t):
            u, c = pipe.guided_predictions([x, x], t, [Guidance(uncond), Guidance(cond)], state)
            return guided(x, t, c, [(u, scale - 1)])

        return fn

    def autoguided_model_fn(guidance, guide, guide_cond, guide_scale):
        guide_fn, state = guide.guided_model_fn(guide_cond, None, 1.0), SelfCondition()

        def fn(x, t):
            if guidance.guided:
                u, c = pipe.guided_predictions([x, x], t, [Guidance(guidance.uncond), Guidance(guidance.cond)], state)
                others = [(u, guidance.scale - 1)]
            else:
                c, others = pipe.guided_predictions([x], t, [guidance], state)[0], []
            return guided(x, t, c, [*others, (guide_fn(x, t), guide_scale)])

        return fn

    pipe.guided_model_fn, pipe.autoguided_model_fn = guided_model_fn, autoguided_model_fn


def quick_model(out: Path) -> tuple[Path, Path]:
    """``--quick``: a tiny demo folder and a model trained on it for two steps."""
    demo = quick_demo(out / "demo")
    options = RunOptions(out=str(out / "model"), steps=2, batch_size=16, warmup=1, progress=False, resume=False)
    data = DataOptions(data=str(demo / "data"), image_size=IMAGE_SIZE, cache_latents=True)
    return demo, train_text2image(data, options, variant_model("dit_mask", demo, quick=True))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo run the models trained on (its held-out pair)")
    parser.add_argument("--models", default="", help="comma-separated model folders")
    parser.add_argument("--guides", default="", help="comma-separated autoguidance guides, one per model (optional)")
    parser.add_argument("--variants", default="plain,shift2,cfgstar", help="comma-separated; see the docstring")
    parser.add_argument("--sampling-seeds", default="0,100", help="model i samples with seed s + i for each s")
    parser.add_argument("--guidance", type=float, default=None, help="default: each model's own")
    parser.add_argument("--guide-scale", type=float, default=None, help="autoguidance weight (0: none)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--out", default="runs/guidance_screen")
    parser.add_argument("--quick", action="store_true", help="a tiny model trained for two steps (for the tests)")
    args = parser.parse_args(argv)
    out, variants = Path(args.out), args.variants.split(",")
    if unknown := [v for v in variants if not VARIANT.fullmatch(v)]:
        parser.error(f"unknown variant {unknown[0]!r}; choose plain, shiftS, cfgstar, cfgstarK, intervalA-B or apgE")
    if "plain" not in variants:
        variants.insert(0, "plain")  # the reference of every paired difference
    if args.quick:
        demo, model = quick_model(out)
        models, steps, spp, per_kind = [model], 2, 1, 2
    else:
        demo, models = Path(args.demo), [Path(m) for m in args.models.split(",") if m]
        steps, spp, per_kind = args.steps, args.samples_per_prompt, 20
    if not models:
        parser.error("give --models (or --quick)")
    guides = [Path(g) for g in args.guides.split(",") if g]
    if guides and len(guides) != len(models):
        parser.error(f"--guides names {len(guides)} guides for {len(models)} models")
    device = training_device()[0]
    suite = build_suite(per_kind=per_kind, held_out=demo_holdout(demo))
    rows: list[dict] = []
    for i, model in enumerate(models):
        pipe = Text2ImagePipeline.from_pretrained(model, device=device)
        if guides:
            pipe.guide = pipe.check_guide(Text2ImagePipeline.from_pretrained(guides[i], device=device))
        base_shift = getattr(pipe.noise_process.config, "shift", None)
        for seed in [int(s) + i for s in args.sampling_seeds.split(",")]:
            for variant in variants:
                apply_variant(pipe, variant, base_shift)
                report = evaluate_pipeline(
                    pipe, suite, spp, num_inference_steps=steps, guidance_scale=args.guidance, seed=seed,
                    progress=False, guide_scale=args.guide_scale,
                )  # fmt: skip
                rows.append({"model": str(model), "seed": seed, "variant": variant, "overall": report.overall,
                             **report.accuracy})  # fmt: skip
                out.mkdir(parents=True, exist_ok=True)
                (out / "guidance_screen.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(machine_line(device))
    print(versions_line())
    categories = [k for k in rows[0] if k not in ("model", "seed", "variant")]
    plain = {(r["model"], r["seed"]): r for r in rows if r["variant"] == "plain"}
    print("| variant | n | " + " | ".join(categories) + " |")
    print("| --- | ---: |" + " ---: |" * len(categories))
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        cells = []
        for c in categories:
            diffs = [r[c] - plain[r["model"], r["seed"]][c] for r in mine]
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            cells.append(f"{statistics.mean(r[c] for r in mine):.3f} ({statistics.mean(diffs):+.3f} ± {spread:.3f})")
        print(f"| {variant} | {len(mine)} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
