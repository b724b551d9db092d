"""The Gaussian noise maths: schedules, targets, conversions and samplers, with diffusers as the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from cyclediffusion.diffusion import GaussianConfig, GaussianDiffusion
from cyclediffusion.diffusion.schedules import cosine_alpha_bar

diffusers = pytest.importorskip("diffusers")

PREDICTIONS = ("epsilon", "x0", "v_prediction")
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v_prediction": "v_prediction"}
DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, non-trivial function of (x, t) standing in for a network."""
    return 0.7 * torch.tanh(x) + 0.1 * torch.sin(x * 3 + t.float().view(-1, 1, 1, 1) / 100)


def test_cosine_schedule_equals_closed_form():
    process = GaussianDiffusion(GaussianConfig(beta_schedule="cosine"))
    betas, abar = process.betas, process.alphas_cumprod
    assert betas.max() <= 0.999
    clipped = (betas >= 0.999).nonzero()
    first_clipped = int(clipped[0]) if len(clipped) else len(betas)
    assert first_clipped >= 990  # only the very end is clipped
    closed = torch.tensor(
        [cosine_alpha_bar((i + 1) / 1000) / cosine_alpha_bar(0.0) for i in range(1000)], dtype=torch.float64
    )
    torch.testing.assert_close(abar[:first_clipped], closed[:first_clipped], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_schedules_match_diffusers(schedule):
    kwargs = {"beta_start": 0.00085, "beta_end": 0.012} if schedule == "scaled_linear" else {}
    ours = GaussianDiffusion(GaussianConfig(beta_schedule=schedule, **kwargs))
    theirs = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule], **kwargs)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 1000])
def test_spacing_matches_diffusers(spacing, steps):
    ours = GaussianDiffusion(GaussianConfig(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0))
    theirs = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=ours.config.steps_offset)
    theirs.set_timesteps(steps)
    assert ours.timesteps(steps).tolist() == theirs.timesteps.tolist()
    assert len(set(ours.timesteps(steps).tolist())) == steps


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_prediction_types_round_trip(prediction, schedule):
    process = GaussianDiffusion(GaussianConfig(prediction_type=prediction, beta_schedule=schedule))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    # Up to t=990: at the very end of the cosine schedule a_t ~ 1e-8 and x0 is not recoverable
    # from an epsilon prediction in float32 (nor by any sampler).
    t = torch.tensor([0, 10, 500, 900, 990])
    x_t = process.add_noise(x0, eps, t)
    x0_hat, eps_hat = process.to_x0_eps(process.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)


def test_v_target_formula():
    process = GaussianDiffusion(GaussianConfig(prediction_type="v_prediction"))
    x0, eps, t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.tensor([3, 700])
    a = process.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(process.target(x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_with_oracle_recovers_x0_from_any_start(prediction, spacing):
    process = GaussianDiffusion(GaussianConfig(prediction_type=prediction, timestep_spacing=spacing))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=g)

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = process.alpha_bar(t.long(), x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return process.target(x0, eps, t.long())

    for start_scale in (1.0, 5.0):
        x_T = start_scale * torch.randn(3, 4, 8, 8, generator=g)
        out = process.sample(oracle, x_T, num_inference_steps=20, eta=0.0)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_loss_regresses_the_configured_target():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 4, 4, generator=g)
    for prediction in PREDICTIONS:
        process = GaussianDiffusion(GaussianConfig(prediction_type=prediction))
        noise = torch.randn_like(x0)
        t = torch.tensor([1, 250, 600, 999])
        exact = process.target(x0, noise, t)
        perfect = process.training_loss(lambda x, s, e=exact: e, x0, noise=noise, t=t)
        assert perfect.loss.shape == (4,)
        assert perfect.loss.max() < 1e-10
        torch.testing.assert_close(perfect.level, t.float() / 999)
        others = [p for p in PREDICTIONS if p != prediction]
        for other in others:
            wrong = GaussianDiffusion(GaussianConfig(prediction_type=other)).target(x0, noise, t)
            loss = process.training_loss(lambda x, s, w=wrong: w, x0, noise=noise, t=t).loss
            assert loss.mean() > 1e-2


def test_training_loss_feeds_noised_input_and_time():
    process = GaussianDiffusion()
    x0, noise, t = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3), torch.tensor([5, 800])
    seen = {}

    def model(x, s):
        seen["x"], seen["t"] = x, s
        return torch.zeros_like(x)

    process.training_loss(model, x0, noise=noise, t=t)
    torch.testing.assert_close(seen["x"], process.add_noise(x0, noise, t))
    torch.testing.assert_close(seen["t"], torch.tensor([5.0, 800.0]))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights(prediction):
    process = GaussianDiffusion(GaussianConfig(prediction_type=prediction, snr_gamma=5.0))
    t = torch.tensor([0, 100, 999])
    snr = process.snr(t)
    w = process.loss_weight(t)
    expected = {
        "epsilon": torch.minimum(snr, torch.tensor(5.0)) / snr,
        "x0": torch.minimum(snr, torch.tensor(5.0)),
        "v_prediction": torch.minimum(snr, torch.tensor(5.0)) / (snr + 1),
    }[prediction]
    torch.testing.assert_close(w, expected)
    # At t=0 the SNR is huge: epsilon weight is gamma/snr << 1; at t=999 it is 1.
    if prediction == "epsilon":
        assert w[0] < 1e-2 and w[2] == 1.0
    assert GaussianDiffusion(GaussianConfig(prediction_type=prediction)).loss_weight(t) is None


def _diffusers_ddim(spacing: str, prediction: str, schedule: str, steps: int, offset: int = 0):
    sched = diffusers.DDIMScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[schedule],
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        clip_sample=False,
        timestep_spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=True,
    )
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_steps_match_diffusers(spacing, prediction, eta, schedule):
    steps = 10
    ours = GaussianDiffusion(
        GaussianConfig(prediction_type=prediction, beta_schedule=schedule, timestep_spacing=spacing)
    )
    theirs = _diffusers_ddim(spacing, prediction, schedule, steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = ours.timesteps(steps).tolist()
    assert timesteps == theirs.timesteps.tolist()
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < steps else -1
        # diffusers' DDIM always steps back by T // n; on a non-uniform grid (linspace) give it the
        # step count whose stride equals this step's gap, so both take the same step.
        gap = t - t_prev if t_prev >= 0 else t + 1
        theirs.num_inference_steps = steps if spacing != "linspace" else 1000 // gap
        if t_prev >= 0 and t - 1000 // theirs.num_inference_steps != t_prev:
            continue
        pred = fake_model(x, torch.tensor([t]))
        noise = torch.randn(x.shape, generator=g)
        expected = theirs.step(pred, t, x, eta=eta, variance_noise=noise).prev_sample
        got = ours.step(pred, x, t, t_prev, eta=eta, noise=noise)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        x = expected


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_sampler_matches_diffusers_loop(prediction, steps):
    ours = GaussianDiffusion(GaussianConfig(prediction_type=prediction))
    theirs = diffusers.DDPMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=False)
    theirs.set_timesteps(steps)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    x = x_T.clone()
    g = torch.Generator().manual_seed(7)
    for t in theirs.timesteps:
        x = theirs.step(fake_model(x, t.view(1)), t, x, generator=g).prev_sample

    got = ours.sample(fake_model, x_T.clone(), steps, sampler="ddpm", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)


def test_full_ddim_loop_matches_diffusers_with_generator():
    ours = GaussianDiffusion(GaussianConfig(prediction_type="v_prediction", timestep_spacing="trailing"))
    theirs = _diffusers_ddim("trailing", "v_prediction", "linear", 25)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x = x_T.clone()
    g = torch.Generator().manual_seed(11)
    for t in theirs.timesteps:
        x = theirs.step(fake_model(x, t.view(1)), t, x, eta=0.5, generator=g).prev_sample
    got = ours.sample(fake_model, x_T, 25, eta=0.5, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)


def test_generator_list_draws_rows_independently():
    process = GaussianDiffusion()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    both = process.sample(
        fake_model, x_T, 5, sampler="ddpm", generator=[torch.Generator().manual_seed(s) for s in (1, 2)]
    )
    second = process.sample(fake_model, x_T[1:], 5, sampler="ddpm", generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(both[1:], second)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="prediction type"):
        GaussianConfig(prediction_type="score")
    with pytest.raises(ValueError, match="beta schedule"):
        GaussianConfig(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="num_inference_steps"):
        GaussianDiffusion().timesteps(0)
    with pytest.raises(ValueError, match="eta"):
        GaussianDiffusion().sample(fake_model, torch.zeros(1, 1, 2, 2), 2, eta=1.5)


def test_config_round_trip(tmp_path):
    process = GaussianDiffusion(GaussianConfig(beta_schedule="cosine", prediction_type="v", snr_gamma=5.0))
    process.save_pretrained(tmp_path)
    loaded = GaussianDiffusion.from_pretrained(tmp_path)
    assert loaded.config == process.config
    assert loaded.config.prediction_type == "v_prediction"
    assert math.isclose(float(loaded.alphas_cumprod[500]), float(process.alphas_cumprod[500]))


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_renoising_a_draw_of_the_path_lands_on_a_draw_of_the_noisier_point(process):
    """RePaint's step back up: q(x_t | x_p) after q(x_p | x0) is q(x_t | x0), with mean alpha_t x0 and spread
    sigma_t; an exact draw of the clean end (t_prev at the clean end) is plain noising."""
    from cyclediffusion.diffusion import FlowMatching

    path = GaussianDiffusion() if process == "ddpm" else FlowMatching()
    (t, t_prev), *_ = path.grid(10)[3:]
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([1.5, -0.5]).repeat(200_000, 1)
    x_p = path.add_noise(x0, torch.randn(x0.shape, generator=g), t_prev)
    x_t = path.renoise(x_p, t_prev, t, torch.randn(x0.shape, generator=g))
    alpha, sigma = path.alpha_sigma(t, x0)
    torch.testing.assert_close(x_t.mean(0), alpha[0] * x0[0], atol=1e-2, rtol=0)
    torch.testing.assert_close(x_t.std(0), sigma[0].expand(2), atol=1e-2, rtol=0)
    noise = torch.randn(x0[:4].shape, generator=g)
    clean_end = path.grid(10)[-1][1]
    torch.testing.assert_close(path.renoise(x0[:4], clean_end, t, noise), path.add_noise(x0[:4], noise, t))
