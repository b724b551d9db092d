"""Flow matching: path, velocity target, time sampling, Euler/Heun samplers (diffusers as oracle)."""

from __future__ import annotations

import pytest
import torch

from cyclediffusion.diffusion import FlowConfig, FlowMatching

diffusers = pytest.importorskip("diffusers")


def fake_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x) + 0.2 * torch.cos(t.float().view(-1, 1, 1, 1) / 300)


def test_path_target_and_conversion():
    flow = FlowMatching()
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0.0, 0.25, 0.7, 1.0])
    x_t = flow.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[3], eps[3])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    v = flow.target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    x0_hat, eps_hat = flow.to_x0_eps(v, x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_model_sees_time_scaled_to_1000():
    flow = FlowMatching()
    seen = {}

    def model(x, s):
        seen["t"] = s
        return torch.zeros_like(x)

    t = torch.tensor([0.1, 0.9])
    out = flow.training_loss(model, torch.randn(2, 1, 2, 2), t=t)
    torch.testing.assert_close(seen["t"], torch.tensor([100.0, 900.0]))
    torch.testing.assert_close(out.level, t)


def test_perfect_velocity_has_zero_loss():
    flow = FlowMatching()
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    loss = flow.training_loss(lambda x, s: noise - x0, x0, noise=noise).loss
    assert loss.shape == (3,) and loss.max() < 1e-12


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_time_sampling_distributions(sampling):
    flow = FlowMatching(FlowConfig(time_sampling=sampling))
    t = flow.sample_timesteps(20000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    if sampling == "uniform":
        assert abs(t.mean() - 0.5) < 0.01 and abs(t.std() - (1 / 12) ** 0.5) < 0.01
    else:
        logit = torch.log(t / (1 - t))
        assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_straight_path_oracle_reaches_x0(sampler):
    """With the exact velocity of the straight path, one step or many land on x0."""
    flow = FlowMatching()
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def oracle(x, s):
        t = (s / 1000).view(-1, 1, 1, 1)
        return (x - x0) / t  # exact velocity of the straight line through x and x0

    for steps in (1, 8):
        torch.testing.assert_close(flow.sample(oracle, noise, steps, sampler=sampler), x0, atol=1e-5, rtol=0)


def test_heun_is_second_order():
    """On dx/dt = x from t=1 to 0 (exact: x1 / e), Heun's error falls ~4x per step doubling, Euler's ~2x."""
    flow = FlowMatching()
    x1 = torch.ones(1, 1, 1, 1)
    exact = x1 * torch.exp(torch.tensor(-1.0))

    def model(x, s):
        return x  # dx/dt = x

    errors = {
        sampler: [(flow.sample(model, x1, n, sampler=sampler) - exact).abs().item() for n in (8, 16)]
        for sampler in ("euler", "heun")
    }
    assert 1.8 < errors["euler"][0] / errors["euler"][1] < 2.2
    assert 3.6 < errors["heun"][0] / errors["heun"][1] < 4.4
    assert errors["heun"][1] < errors["euler"][1] / 5


def test_euler_loop_matches_diffusers():
    flow = FlowMatching(FlowConfig(shift=3.0))
    steps = 12
    times = flow.times(steps)
    assert times[0] == 1.0 and times[-1] == 0.0 and torch.all(times[1:] < times[:-1])
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=times[:-1].numpy())
    torch.testing.assert_close(sched.timesteps, flow.model_time(times[:-1]))

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(fake_velocity(x, t.view(1)), t, x).prev_sample
    ours = flow.sample(fake_velocity, x_T, steps, sampler="euler")
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_shift_moves_steps_towards_noise():
    plain, shifted = FlowMatching().times(10), FlowMatching(FlowConfig(shift=3.0)).times(10)
    assert torch.all(shifted[1:-1] > plain[1:-1])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="time sampling"):
        FlowConfig(time_sampling="beta")
    with pytest.raises(ValueError, match="sampler"):
        FlowMatching().sample(fake_velocity, torch.zeros(1, 1, 2, 2), 2, sampler="ddim")


def test_logit_mean_moves_training_times_to_the_noisy_end():
    from cyclediffusion.recipes import build_noise_process
    from cyclediffusion.training.options import ModelOptions

    options = ModelOptions(scheduler="flow", logit_mean=1.0)
    flow = build_noise_process(options.scheduler, **options.noise_options())
    t = flow.sample_timesteps(20000, "cpu", torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 1) < 0.03 and abs(logit.std() - 1) < 0.03
    assert 0.10 < (t > 0.9).float().mean() < 0.13  # 1.4% at the default mean 0
    with pytest.raises(ValueError, match="--logit-mean"):
        ModelOptions(scheduler="ddpm", logit_mean=1.0)
