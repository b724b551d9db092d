"""The cycle-consistency loss: gradients reach only the denoiser and text encoder, W=0 is the plain step,
exact resume, fine-tuning from an exported pipeline, and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from test_captioner import SIZE, tiny_captioner
from test_training import (
    EXACT_FLAGS,
    TINY_FLAGS,
    cli,
    final_weights,
    metrics,
    run_cli,
    tiny_model,
    tiny_run,
    write_folder,
)

from cyclediffusion import create_noise_process
from cyclediffusion.pipelines.caption import CaptionPipeline
from cyclediffusion.text import Tokenizer
from cyclediffusion.training import CycleConfig, DataOptions, train_text2image
from cyclediffusion.training.modules import DiffusionModule, OptimConfig

from helpers import CAPTIONS, randomise_zeros, tiny_denoiser, tiny_text_encoder, tiny_tokenizer, tiny_vae

CONFIGS = [("unet", "ddpm", "vae"), ("dit", "flow", "pixels"), ("unet", "flow", "cached")]


def captioner_pipeline(captions: list[str], seed: int = 0) -> CaptionPipeline:
    """A tiny untrained captioner with a tokenizer of its own (not the text-to-image one)."""
    tokenizer = Tokenizer.train(captions * 2, vocab_size=280, max_length=24)
    return CaptionPipeline(tokenizer, tiny_captioner(tokenizer, seed=seed)).eval()


def build(backbone: str, process: str, space: str, weight: float = 1.0, captioner: bool = True, **cycle):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(max_length=20)
    vae = tiny_vae() if space != "pixels" else None
    channels, size = (4, SIZE // 4) if vae else (3, SIZE)
    denoiser = tiny_denoiser(backbone, channels, size)
    randomise_zeros(denoiser)
    options = {"prediction_type": "v_prediction", "beta_schedule": "cosine"} if process == "ddpm" else {}
    return DiffusionModule(
        tokenizer,
        tiny_text_encoder(tokenizer),
        denoiser,
        create_noise_process(process, **options),
        vae,
        OptimConfig(lr=1e-2, warmup_steps=0),
        caption_dropout=0.5,
        captioner=captioner_pipeline(CAPTIONS) if captioner else None,
        cycle=CycleConfig(weight=weight, **cycle),
    )


def make_batch(module: DiffusionModule, space: str, batch: int, step: int = 0) -> dict:
    g = torch.Generator().manual_seed(step)
    pixels = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    out = {"caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], "step": torch.full((batch,), step)}
    if space == "cached":
        with torch.no_grad():
            out["latent_params"] = module.vae.encode(pixels).parameters
    else:
        out["pixels"] = pixels
    return out


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone,process,space", CONFIGS)
@pytest.mark.parametrize("batch,mode", [(1, "x0"), (3, "x0"), (3, "last-k"), (3, "grpo")])
def test_cycle_gradient_reaches_only_denoiser_and_text_encoder(one_thread, backbone, process, space, batch, mode):
    module = build(backbone, process, space, fraction=0.5, mode=mode, k=2, sample_steps=3)
    out = module.step_losses(make_batch(module, space, batch))
    assert out.cycle is not None and out.cycle.item() > 0
    out.cycle.backward()  # the cycle term alone: the denoising term is left out
    for part in (module.denoiser, module.text_encoder):
        assert any(g.abs().sum() > 0 for g in grads(part).values()), type(part).__name__
    frozen = [module.captioner.captioner] + ([module.vae] if module.vae is not None else [])
    for part in frozen:
        assert all(p.grad is None and not p.requires_grad for p in part.parameters())


def test_frozen_parts_stay_out_of_training_and_never_change(one_thread):
    module = build("unet", "ddpm", "vae")
    captioner, vae = module.captioner.captioner, module.vae
    before = {k: v.clone() for k, v in {**captioner.state_dict(), **vae.state_dict()}.items()}
    denoiser_before = copy.deepcopy(module.denoiser.state_dict())
    opt = module.configure_optimizers()["optimizer"]
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    assert trained == {id(p) for p in [*module.denoiser.parameters(), *module.text_encoder.parameters()]}
    assert all(k.startswith(("denoiser.", "text_encoder.")) for k in module.state_dict())  # checkpoint and EMA
    assert set(module.to_pipeline().components) == {"tokenizer", "text_encoder", "vae", "denoiser", "noise_process"}
    module.train()
    assert not captioner.training and not vae.training
    for step in range(3):
        opt.zero_grad()
        out = module.step_losses(make_batch(module, "vae", 2, step))
        out.loss.backward()
        opt.step()
    after = {**captioner.state_dict(), **vae.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(v, module.denoiser.state_dict()[k]) for k, v in denoiser_before.items())


@pytest.mark.parametrize("backbone,process,space", CONFIGS)
def test_zero_weight_is_the_plain_step(one_thread, backbone, process, space):
    plain = build(backbone, process, space, captioner=False)
    zero = build(backbone, process, space, weight=0.0)
    cycled = build(backbone, process, space, weight=1.0)
    assert zero.cycle is None and zero.captioner is None
    batch = make_batch(plain, space, 3, step=5)
    results = []
    for module in (plain, zero, cycled):
        out = module.step_losses(batch)
        (out.loss if module is not cycled else out.denoise.loss.mean()).backward()
        results.append((out, grads(module)))
    (a, ga), (b, gb), (c, _) = results
    assert b.cycle is None and torch.equal(a.loss, b.loss) and ga.keys() == gb.keys()
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    # the cycle term draws from its own stream: the denoising term of a cycled step is the plain one
    assert torch.equal(c.denoise.loss, a.denoise.loss) and c.cycle is not None


def test_cycle_every_and_t_max():
    module = build("unet", "ddpm", "pixels", every=3, t_max=10)
    assert [module.cycle_due(s) for s in range(4)] == [True, False, False, True]
    assert module.step_losses(make_batch(module, "pixels", 2, step=1)).cycle is None
    g = torch.Generator().manual_seed(0)
    assert int(module.cycle.low_noise_timesteps(1000, g).max()) < 10
    with pytest.raises(ValueError, match="flow matching times"):
        build("unet", "flow", "pixels", t_max=10)
    with pytest.raises(ValueError, match="fraction"):
        CycleConfig(fraction=0)


@pytest.mark.parametrize("space,mode", [("vae", "x0"), ("pixels", "x0"), ("vae", "last-k"), ("pixels", "grpo")])
def test_ranks_together_give_the_single_process_cycle_loss(one_thread, space, mode):
    """Rows, times and noise are drawn for the global batch: two ranks of 3 average to one process of 6."""
    module = build("dit", "ddpm", space, fraction=0.5, mode=mode, sample_steps=4, group=2)
    batch = make_batch(module, space, 6)
    x0 = module.clean_latents(batch, module.step_generator(0))
    single = module.cycle.loss(module, x0, batch["caption"], module.step_generator(0, 1))
    per_rank = []
    for rank in range(2):
        module.world_size = lambda: 2
        module.rank_rows = lambda local, rank=rank: slice(rank * local, (rank + 1) * local)
        rows = slice(3 * rank, 3 * rank + 3)
        per_rank.append(module.cycle.loss(module, x0[rows], batch["caption"][rows], module.step_generator(0, 1)))
    torch.testing.assert_close(sum(per_rank) / 2, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_last_k_draws_the_sampler_image_with_gradient_through_k_steps(one_thread, process):
    """last-k is the plain deterministic sampler from the same noise, and its gradient runs through k calls."""
    module = build("unet", process, "pixels", mode="last-k", k=2, sample_steps=4)
    text = module.text_encoder(module.tokenizer(CAPTIONS[:2]).input_ids)
    noise = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    drawn = module.cycle.draw_last_k(module, noise, text)
    pipe = module.to_pipeline()
    with torch.no_grad():
        model_fn = lambda x, s: module.denoiser(x, s, text.hidden_states, text.pooled)  # noqa: E731
        reference = pipe.noise_process.denoise(model_fn, noise, pipe.noise_process.grid(4))
    torch.testing.assert_close(drawn, reference, rtol=1e-5, atol=1e-5)
    assert drawn.requires_grad

    def denoiser_grads(k: int) -> list[torch.Tensor]:
        module.zero_grad()
        module.cycle.config.k = k
        module.cycle.draw_last_k(module, noise, detached).square().sum().backward()
        return [p.grad.clone() for p in module.denoiser.parameters()]

    # the same image either way, but with k = 2 the gradient also flows through the second-to-last call
    with torch.no_grad():
        detached = module.text_encoder(module.tokenizer(CAPTIONS[:2]).input_ids)
    one, two = denoiser_grads(1), denoiser_grads(2)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(one, two))
    with pytest.raises(ValueError, match="k <= sample_steps"):
        CycleConfig(mode="last-k", k=5, sample_steps=4)
    for bad, message in [({"group": 1}, "at least 2"), ({"eta": 0.0}, "stochastic"), ({"k": 4}, "deterministic")]:
        with pytest.raises(ValueError, match=message):
            CycleConfig(mode="grpo", sample_steps=4, **bad)


def save_captioner(tmp_path, data) -> str:
    captions = [line.split('"text": "')[1].split('"')[0] for line in (data / "metadata.jsonl").read_text().splitlines()]
    path = tmp_path / "cap"
    captioner_pipeline(sorted(set(captions))).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("mode", ["x0", "grpo"])
def test_cycle_training_resumes_exactly(tmp_path, one_thread, mode):
    data = write_folder(tmp_path / "data")
    options = DataOptions(data=str(data), image_size=16)
    model = tiny_model()
    model.captioner = save_captioner(tmp_path, data)
    grpo = {"group": 2, "sample_steps": 3, "k": 1} if mode == "grpo" else {}
    model.cycle = CycleConfig(weight=0.5, fraction=0.5, every=2, mode=mode, **grpo)
    straight = train_text2image(options, tiny_run(tmp_path / "a", steps=4), model)
    first = tmp_path / "b"
    train_text2image(options, tiny_run(first, steps=2), model)
    train_text2image(options, tiny_run(first, steps=4), model)  # resumes
    a, b = final_weights(straight.parent), final_weights(first)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    rows = metrics(first)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("train/denoise_loss" in r for r in rows)
    assert [("train/cycle_loss" in r) for r in rows] == [True, False, True, False]  # the steps that carry it
    assert not (first / "model" / "captioner").exists()


def test_cli_fine_tune_with_the_cycle_loss(tmp_path, monkeypatch, one_thread):
    data = write_folder(tmp_path / "data")
    captioner = save_captioner(tmp_path, data)
    train_text2image(DataOptions(data=str(data), image_size=16), tiny_run(tmp_path / "base", steps=2), tiny_model())
    flags = ["--data", str(data), "--image-size", "16", "--steps", "2", "--batch-size", "4", "--log-every", "1"]
    args = ["train", *flags, "--out", "ft", "--init-from", "base", "--captioner", captioner, "--cycle-weight", "0.5"]
    assert run_cli(*args, "--lr", "1e-12", "--cycle-fraction", "0.5", cwd=tmp_path, monkeypatch=monkeypatch) == 0
    base, tuned = final_weights(tmp_path / "base"), final_weights(tmp_path / "ft")
    for key in base:  # a vanishing rate: the starting weights, loaded (a fresh init would be ~0.1 away)
        torch.testing.assert_close(tuned[key], base[key], atol=1e-9, rtol=0, msg=key)
    for part in ("tokenizer/tokenizer.json", "noise_process/config.json"):
        assert (tmp_path / "base" / "model" / part).read_text() == (tmp_path / "ft" / "model" / part).read_text()
    assert "train/cycle_loss" in metrics(tmp_path / "ft")[-1]


@pytest.mark.parametrize("mode", ["last-k", "grpo"])
def test_ddp_cycle_step_equals_single_process(tmp_path, mode):
    """Two gloo processes with half the batch each take the single process's cycle step."""
    data = write_folder(tmp_path / "data")
    cycle = ["--captioner", save_captioner(tmp_path, data), "--cycle-weight", "0.5", "--cycle-fraction", "0.5"]
    cycle += ["--cycle-mode", mode, "--cycle-sample-steps", "3", *(["--cycle-group", "2"] if mode == "grpo" else [])]
    common = ["--data", str(data), "--steps", "1", *TINY_FLAGS, "--accelerator", "cpu", "--ema-decay", "0", *cycle]
    common += EXACT_FLAGS
    cli("train", "--out", "single", "--batch-size", "8", *common, cwd=tmp_path)
    cli("train", "--out", "ddp", "--batch-size", "4", "--devices", "2", "--strategy", "ddp", *common, cwd=tmp_path)
    single, ddp = metrics(tmp_path / "single")[0], metrics(tmp_path / "ddp")[0]
    assert single["train/cycle_loss"] > 0
    for key in ("train/loss", "train/cycle_loss"):
        assert abs(single[key] - ddp[key]) < 1e-5, (key, single[key], ddp[key])
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--captioner", "nowhere"], "nowhere does not exist"),
        (["--captioner", "."], "holds no model"),
        (["--cycle-weight", "0.5"], "need --captioner"),
        (["--captioner", "CAP", "--cycle-fraction", "2"], "fraction"),
        (["--captioner", "CAP", "--cycle-mode", "last-k", "--cycle-k", "5", "--cycle-sample-steps", "4"], "k <="),
        (["--captioner", "CAP", "--image-size", "32"], "reads 16px images"),
        (["--captioner", "CAP", "--cycle-mode", "grpo", "--cycle-group", "1"], "group needs at least 2"),
        (["--init-from", "nowhere"], "nowhere does not exist"),
    ],
)
def test_cli_cycle_errors_are_one_line(tmp_path, monkeypatch, capsys, extra, message):
    data = write_folder(tmp_path / "data", n=4)
    extra = [save_captioner(tmp_path, data) if e == "CAP" else e for e in extra]
    args = ["train", "--data", str(data), "--out", "r", "--steps", "1", "--image-size", "16", *extra]
    assert run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "cyclediffusion" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
