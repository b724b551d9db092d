"""Few-step sampling: DPM-Solver++(2M) equals diffusers' DPMSolverMultistepScheduler step for step, and on the flow
path it is far closer to the exact ODE solution than Euler at the same number of network calls."""

from __future__ import annotations

import pytest
import torch

from cyclediffusion import create_noise_process

from helpers import tiny_pipeline

diffusers = pytest.importorskip("diffusers")


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a network: depends on the input and the time."""
    return 0.6 * torch.tanh(x) + 1e-3 * t.reshape(-1, *[1] * (x.ndim - 1)) * x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [4, 10, 20])
def test_dpm_solver_matches_diffusers(prediction_type, steps):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    ours = create_noise_process("ddpm", timestep_spacing="trailing", **config)
    theirs = diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing", **config)
    theirs.set_timesteps(steps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for t in theirs.timesteps:
        x = theirs.step(toy_model(x, t.float().expand(2)), t, x).prev_sample
    got = ours.sample(toy_model, noise, steps, sampler="dpm++2m")
    assert [t for t, _ in ours.grid(steps)] == theirs.timesteps.tolist()
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_dpm_solver_is_second_order_on_the_flow_path():
    """Data ~ N(0, s^2): E[x0 | x_t] is linear in x_t, so the exact velocity is known; an 8000-step Euler run is the
    reference solution of the ODE. (The last step lands on the estimate of x0, as diffusers' does, which costs
    O(t_last^2) against the ODE's own end point.)"""
    process, s = create_noise_process("flow"), 0.5

    def velocity(x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        t = (model_time / 1000).reshape(-1, 1, 1, 1).double()
        x0 = (1 - t) * s**2 / ((1 - t) ** 2 * s**2 + t**2) * x.double()
        eps = (x.double() - (1 - t) * x0) / t.clamp_min(1e-12)
        return (eps - x0).float()

    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    exact = process.sample(velocity, noise, 8000, sampler="euler")

    def error(steps: int, sampler: str) -> float:
        return float((process.sample(velocity, noise, steps, sampler=sampler) - exact).abs().max())

    for steps in (10, 20):  # measured: 0.010 against 0.230, 0.019 against 0.119
        assert error(steps, "dpm++2m") < 0.25 * error(steps, "euler"), steps
    assert error(20, "dpm++2m") < error(10, "heun")  # the same 20 network calls
    with pytest.raises(ValueError, match="deterministic"):
        process.sample(velocity, noise, 4, sampler="dpm++2m", eta=0.5)


def test_pipeline_samples_with_dpm_solver():
    torch.manual_seed(0)
    pipe = tiny_pipeline("unet", "ddpm", vae=True)
    out = pipe("a red square", num_inference_steps=5, sampler="dpm++2m", output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert out.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(out)).all()


def test_stochastic_flow_sampler_draws_the_data_distribution():
    """Data ~ N(m, s^2) per coordinate, exact velocity: DDIM's stochastic step on the flow path (euler, eta > 0)
    draws samples of the data's mean and spread, different ones per generator, the same ones for the same
    generator; eta = 0 is the plain Euler ODE; heun and dpm++2m refuse eta."""
    process, m, s = create_noise_process("flow"), 0.7, 0.5

    def velocity(x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        t = (model_time / 1000).reshape(-1, 1).double()
        x0 = m + (1 - t) * s**2 / ((1 - t) ** 2 * s**2 + t**2) * (x.double() - (1 - t) * m)
        eps = (x.double() - (1 - t) * x0) / t.clamp_min(1e-12)
        return (eps - x0).float()

    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    for eta in (0.5, 1.0):  # at 25 steps the spread falls short (0.467, 0.447; Euler 0.473): ancestral steps from the
        # x0 estimate leave out Var[x0 | x_t]; at 400 steps 0.500, 0.498
        x = process.sample(velocity, noise, 400, eta=eta, generator=torch.Generator().manual_seed(1))
        assert abs(x.mean().item() - m) < 0.01 and abs(x.std().item() - s) < 0.01, (eta, x.mean(), x.std())
    again = process.sample(velocity, noise, 400, eta=1.0, generator=torch.Generator().manual_seed(1))
    other = process.sample(velocity, noise, 400, eta=1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(again, x)
    assert (other - x).abs().mean() > 0.1  # fresh noise at every step: not the ODE's deterministic map
    torch.testing.assert_close(process.sample(velocity, noise, 25, eta=0.0), process.sample(velocity, noise, 25))
    for sampler in ("heun", "dpm++2m"):
        with pytest.raises(ValueError, match="deterministic"):
            process.sample(velocity, noise, 4, sampler=sampler, eta=0.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        process.sample(velocity, noise, 4, eta=1.5)
