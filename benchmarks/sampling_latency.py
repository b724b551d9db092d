"""Sampling latency of a Text2ImagePipeline: time per image at 10, 25 and 50 steps, guided and not.

    python benchmarks/sampling_latency.py                        # the demo's architecture, fresh weights
    python benchmarks/sampling_latency.py --model runs/demo/t2i  # a trained pipeline (run or model folder)
    python benchmarks/sampling_latency.py --quick                # tiny model, 2 steps, batch 1: seconds

Each row is one call of the pipeline (prompt encoding, the sampler's steps, VAE decoding, no PNG writing):
the median over ``--repeats`` timed calls after ``--warmup`` untimed ones, for batch sizes 1 and 8 and guidance scale 1
(one denoiser pass per step) and 2 (classifier-free guidance: conditional and unconditional in one batched
pass). Peak memory is ``torch.cuda.max_memory_allocated`` per row on a GPU; on the CPU it is the process's
peak resident set size (``resource.getrusage``, a high-water mark) after the row and how much the row raised it.
Latency does not depend on the weights, so the default model is freshly initialised: the demo's
architecture (4x "tiny" VAE, "small" U-Net, 32 px images, 128-wide text encoder, cosine v-prediction DDIM).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import machine_line, peak_rss_mib, sync, versions_line

from cyclediffusion import Text2ImagePipeline, Tokenizer
from cyclediffusion.data.shapes import ShapesConfig, caption_for, sample_prompt
from cyclediffusion.pipelines.storage import resolve_model_dir
from cyclediffusion.recipes import build_vae
from cyclediffusion.training.options import ModelOptions

IMAGE_SIZE = 32


def shapes_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of the built-in shapes world (what the demo trains on)."""
    rng, config = np.random.default_rng(seed), ShapesConfig(size=IMAGE_SIZE)
    return [caption_for(sample_prompt(rng, config)) for _ in range(n)]


def demo_pipeline(model_size: str = "small", vae_size: str = "tiny", seed: int = 0) -> Text2ImagePipeline:
    """A freshly initialised pipeline with the demo's architecture (``train`` defaults, ``run_demo``'s sizes)."""
    torch.manual_seed(seed)
    options = ModelOptions(model_size=model_size)
    captions = shapes_captions(500, seed)
    probe = Tokenizer.train(captions, vocab_size=options.vocab_size, max_length=77)
    longest = int(probe(captions).attention_mask.sum(1).max())
    tokenizer = Tokenizer.train(captions, vocab_size=options.vocab_size, max_length=8 * -(-longest // 8))
    vae = build_vae(vae_size, 4)
    return Text2ImagePipeline(tokenizer, vae=vae, **options.build(tokenizer, vae, IMAGE_SIZE)).eval()


def parameters(pipe: Text2ImagePipeline) -> str:
    """Millions of parameters of the denoiser, text encoder and VAE."""
    parts = [(name, getattr(pipe, name)) for name in ("denoiser", "text_encoder", "vae")]
    return ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for n, m in parts if m is not None)


def time_call(
    pipe: Text2ImagePipeline, prompts: list[str], steps: int, guidance: float, device: str, guide_scale: float | None
) -> float:
    """Seconds for one pipeline call (seeded, tensors out)."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    sync(device)
    t0 = time.perf_counter()
    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt",
         guide_scale=guide_scale)  # fmt: skip
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a trained pipeline (default: the demo's, fresh weights)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps, batch 1, one repeat")
    parser.add_argument("--steps", default="10,25,50", help="comma-separated sampler steps")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--guidance", default="1,2", help="comma-separated guidance scales (1: unguided)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (the median is shown)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each row")
    parser.add_argument("--model-size", default="small", help="U-Net size of the fresh model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="cast the networks")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    parser.add_argument(
        "--guide-scale", type=float, default=None, help="autoguidance weight of a model with a guide (0: none)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    steps_list = [2] if args.quick else [int(s) for s in args.steps.split(",")]
    batches = [1] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    guidances = [float(g) for g in args.guidance.split(",")]
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    dtype = getattr(torch, args.dtype)

    if args.model:
        pipe = Text2ImagePipeline.from_pretrained(resolve_model_dir(args.model), device=args.device)
        source = f"{args.model} (trained)"
    else:
        size = "tiny" if args.quick else args.model_size
        pipe = demo_pipeline(model_size=size)
        source = f"fresh weights, demo architecture: U-Net {size!r}, VAE 'tiny' 4x"
    pipe.to(args.device, dtype).eval()
    if args.compile:
        pipe.denoiser = torch.compile(pipe.denoiser)
    height = pipe.denoiser.config.sample_size * pipe.latent_factor
    prompts = shapes_captions(max(batches), seed=1)
    gpu = args.device.startswith("cuda")
    torch.manual_seed(0)

    print(machine_line(args.device))
    print(versions_line())
    print(f"model: {source}; {parameters(pipe)}; {height}x{height} images")
    process = type(pipe.noise_process).__name__
    target = getattr(pipe.noise_process.config, "prediction_type", None)
    print(
        f"sampler: {process}{f' ({target})' if target else ''}, its default sampler; dtype {args.dtype}"
        f"{', torch.compile' if args.compile else ''}; median of {repeats} timed call(s) after {warmup} untimed"
    )
    guide_scale = pipe.guide_scale if args.guide_scale is None else args.guide_scale
    guided = pipe.guide is not None and guide_scale > 0
    print("autoguidance: " + (f"by the model's own guide, weight {guide_scale:g}" if guided else "none"))
    memory = "peak CUDA memory allocated (MiB)" if gpu else "process peak RSS, MiB (raised by this row)"
    print(f"memory: {memory}\n")
    print(f"| batch | steps | guidance | s / call | ms / image | images / s | {memory} |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    results = []
    with torch.inference_mode():
        for batch in batches:
            for steps in steps_list:
                for guidance in guidances:
                    if gpu:
                        torch.cuda.reset_peak_memory_stats()
                    before = peak_rss_mib()
                    for _ in range(warmup):  # first calls at new shapes are slow (kernel choice, compile)
                        time_call(pipe, prompts[:batch], steps, guidance, args.device, args.guide_scale)
                    seconds = statistics.median(
                        time_call(pipe, prompts[:batch], steps, guidance, args.device, args.guide_scale)
                        for _ in range(repeats)
                    )
                    if gpu:
                        mem = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
                    else:
                        after = peak_rss_mib()
                        mem = f"{after:.0f} (+{after - before:.0f})"
                    print(
                        f"| {batch} | {steps} | {guidance:g} | {seconds:.3f} | {1000 * seconds / batch:.1f} "
                        f"| {batch / seconds:.1f} | {mem} |"
                    )
                    results.append({"batch": batch, "steps": steps, "guidance": guidance, "seconds": seconds})
    return results


if __name__ == "__main__":
    main()
