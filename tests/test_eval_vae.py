"""VAE evaluation: PSNR and SSIM against their formulas, latent statistics, a short fit, and ``eval-vae``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cyclediffusion.cli import main
from cyclediffusion.data.shapes import ShapesConfig, write_imagefolder
from cyclediffusion.eval import evaluate_vae, find_vae_dir, holdout_subset, psnr, ssim
from cyclediffusion.eval.vae_eval import PSNR_CAP, shapes_ceiling
from cyclediffusion.models.vae import measure_latent_scaling

from helpers import squares, tiny_pipeline, tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")

C1, C2 = 0.01**2, 0.03**2


# --------------------------------------------------------------------------- PSNR
def test_psnr_identical_is_capped_and_known_mse_matches_formula() -> None:
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(psnr(x, x), torch.full((3,), PSNR_CAP, dtype=torch.float64))
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 everywhere on image 0: 20 dB
    y[1, :, :4] += 0.2  # half the pixels off by 0.2: MSE 0.02
    out = psnr(y, x)
    torch.testing.assert_close(out[0], torch.tensor(20.0, dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor(10 * math.log10(1 / 0.02), dtype=torch.float64))
    assert out[2] == PSNR_CAP
    torch.testing.assert_close(psnr(y, x, data_range=2.0)[0], torch.tensor(10 * math.log10(4 / 0.01)).double())
    with pytest.raises(ValueError):
        psnr(x, x[:2])


# --------------------------------------------------------------------------- SSIM
def test_ssim_of_identical_images_is_one_and_drops_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = (squares(4, 32) + 1) / 2
    torch.testing.assert_close(ssim(x, x), torch.ones(4, dtype=torch.float64))
    values = []
    for level in (0.02, 0.05, 0.1, 0.3):
        noisy = (x + level * torch.randn(x.shape, generator=g)).clamp(0, 1)
        values.append(ssim(noisy, x).mean().item())
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[0] < 1 and values[-1] < 0.5
    torch.testing.assert_close(ssim(noisy, x), ssim(x, noisy))  # symmetric


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    a, b = 0.3, 0.7
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    expected = (2 * a * b + C1) / (a * a + b * b + C1)  # no variance: the contrast-structure term is C2 / C2
    torch.testing.assert_close(ssim(x, y), torch.tensor([expected], dtype=torch.float64))


def direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of (C, H, W) float64 arrays written out: an 11x11 Gaussian window (sigma 1.5) at every valid position."""
    k = np.arange(11) - 5.0
    g = np.exp(-(k**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                px, py = x[c, i : i + 11, j : j + 11], y[c, i : i + 11, j : j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + C1) * (2 * cov + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    return float(np.mean(values))


@pytest.mark.parametrize("shape", [(1, 11, 11), (3, 13, 12)])
def test_ssim_matches_the_written_out_formula(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2, *shape))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    got = ssim(torch.from_numpy(x), torch.from_numpy(y))
    expected = torch.tensor([direct_ssim(x[i], y[i]) for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- evaluate_vae
class Pixels(torch.utils.data.Dataset):
    """Items like CaptionedImages': ``{"pixels": (3, H, W), "caption": str}``."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"pixels": self.images[index], "caption": "a square"}


def test_trained_vae_reports_higher_psnr_and_consistent_latent_stats() -> None:
    torch.manual_seed(0)
    vae = tiny_vae(downsample=2)
    images = squares(8)
    untrained = evaluate_vae(vae, images, batch_size=4)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        recon, posterior = vae(images, generator=g)
        loss = (recon - images).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    scale, shift = measure_latent_scaling(vae, images.split(4), sample=False)
    vae.config.scaling_factor, vae.config.shift_factor = scale, shift
    vae.train()
    trained = evaluate_vae(vae, images, batch_size=4, seed=3)
    assert vae.training  # mode restored
    assert trained.psnr > untrained.psnr + 3, (untrained.psnr, trained.psnr)
    assert trained.ssim > untrained.ssim
    assert trained.num_images == 8 and trained.image_size == (16, 16) and trained.latent_shape == (4, 8, 8)
    assert len(trained.latent_mean) == len(trained.latent_std) == 4
    # factors measured on latent means, so the scaled means have mean 0 and std 1 over all elements
    assert abs(trained.latent_overall_mean) < 1e-4 and abs(trained.latent_overall_std - 1) < 1e-4
    assert (trained.scaling_factor, trained.shift_factor) == (scale, shift)
    # the measured factors are measure_latent_scaling's (posterior samples, same generator)
    expected = measure_latent_scaling(vae, images.split(4), generator=torch.Generator().manual_seed(3))
    assert trained.measured_scaling_factor == pytest.approx(expected[0], rel=1e-9)
    assert trained.measured_shift_factor == pytest.approx(expected[1], rel=1e-9, abs=1e-12)
    # the same numbers from a dataset of {"pixels": ...} items and from an iterable of batches
    assert evaluate_vae(vae, Pixels(images), batch_size=4, seed=3).to_json() == trained.to_json()
    assert evaluate_vae(vae, [{"pixels": b} for b in images.split(4)], seed=3).to_json() == trained.to_json()
    assert evaluate_vae(vae, holdout_subset(Pixels(images), 0.5)).num_images == 4
    table, js = trained.table(), trained.to_json()
    assert "PSNR" in table and "SSIM" in table and json.loads(json.dumps(js))["latent_shape"] == [4, 8, 8]


def test_holdout_subset() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(20))
    last = holdout_subset(data, 0.25)
    assert [int(last[i][0]) for i in range(len(last))] == [15, 16, 17, 18, 19]
    assert holdout_subset(data, 1.0) is data and len(holdout_subset(data, 0.01)) == 1
    with pytest.raises(ValueError):
        holdout_subset(data, 0.0)


# --------------------------------------------------------------------------- ShapesEval ceiling
class FakeVAE(torch.nn.Module):
    """``decode(encode(x).mean)`` is ``x`` (``grey``: its grey level, so no colour survives)."""

    downsample_factor = 4

    def __init__(self, grey: bool = False) -> None:
        super().__init__()
        self.grey = grey
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor):
        return type("Posterior", (), {"mean": x.mean(1, keepdim=True).expand_as(x) if self.grey else x})()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def test_shapes_ceiling_is_what_survives_the_reconstruction() -> None:
    perfect = shapes_ceiling(FakeVAE(), samples_per_prompt=1)
    assert min(perfect.accuracy.values()) >= 0.95 and len(perfect.records) == 142
    grey = shapes_ceiling(FakeVAE(grey=True), samples_per_prompt=1)
    # only the white objects keep their colour; no two-colour scene survives
    assert grey.accuracy["colour"] < 0.2 and grey.accuracy["attribute_binding"] == 0 and grey.overall < 0.2
    assert shapes_ceiling(FakeVAE(), samples_per_prompt=1, seed=1).records != perfect.records


# --------------------------------------------------------------------------- eval-vae
@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("data") / "shapes", 10, ShapesConfig(size=16), seed=0)


def test_cli_eval_vae_writes_json(tmp_path, shapes_folder, capsys) -> None:
    tiny_vae().save_pretrained(tmp_path / "run" / "model")  # a train-vae run folder
    out = tmp_path / "report.json"
    args = ["eval-vae", "--model", str(tmp_path / "run"), "--data", str(shapes_folder), "--image-size", "16"]
    assert main([*args, "--holdout", "0.5", "--batch-size", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_images"] == 5 and report["model"] == str(tmp_path / "run" / "model")
    for key in ("psnr", "ssim", "mse", "latent_overall_std", "scaling_factor", "measured_scaling_factor"):
        assert math.isfinite(report[key]), key
    assert len(report["latent_mean"]) == len(report["latent_std"]) == 4 and 0 < report["ssim"] <= 1
    assert "| PSNR" in capsys.readouterr().out
    assert "shapes_ceiling" not in report
    assert main([*args, "--shapes-eval", "1", "--out", str(out)]) == 0
    ceiling = json.loads(out.read_text())["shapes_ceiling"]
    assert set(ceiling["accuracy"]) >= {"attribute_binding", "colour"} and 0 <= ceiling["overall"] < 0.5  # untrained
    assert "perfect denoiser" in capsys.readouterr().out
    # an exported pipeline: its vae/ is evaluated, the JSON goes to the run's eval/ folder
    tiny_pipeline(vae=True).save_pretrained(tmp_path / "t2i" / "model")
    assert find_vae_dir(tmp_path / "t2i") == tmp_path / "t2i" / "model" / "vae"
    assert main(["eval-vae", "--model", str(tmp_path / "t2i"), "--data", str(shapes_folder), "--image-size", "16"]) == 0
    assert json.loads((tmp_path / "t2i" / "eval" / "vae_eval.json").read_text())["num_images"] == 10


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("pixels", "has no VAE"),
        ("bad-size", "not a multiple"),
        ("bad-holdout", "--holdout"),
        ("bad-shapes-eval", "--shapes-eval"),
    ],
)
def test_cli_eval_vae_bad_input_exits_2_with_one_line(tmp_path, shapes_folder, capsys, case, message) -> None:
    model = tmp_path / "nothing-here"
    extra = []
    if case == "pixels":
        tiny_pipeline(vae=False).save_pretrained(model)
    elif case in ("bad-size", "bad-holdout", "bad-shapes-eval"):
        tiny_vae().save_pretrained(model)
        bad = {"bad-size": ["--image-size", "18"], "bad-holdout": ["--holdout", "1.5"]}
        extra = bad.get(case, ["--shapes-eval", "-1"])
    code = main(["eval-vae", "--model", str(model), "--data", str(shapes_folder), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
