"""Every option declared once: the CLI is built from the option dataclasses, config files round-trip, the seeds'
commands run, and the defects a new user meets give one line."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from test_captioner import tiny_captioner
from test_training import TINY_FLAGS, run_cli, write_folder

from cyclediffusion import AutoencoderKL, CaptionPipeline, DiT, Text2ImagePipeline, UNet
from cyclediffusion.cli import main
from cyclediffusion.images import preprocess_image
from cyclediffusion.models import Denoiser, LatentCodec
from cyclediffusion.options import default_of, spellings
from cyclediffusion.training.options import (
    COMMANDS,
    RECIPE_DEFAULTS,
    CycleConfig,
    DataOptions,
    ModelOptions,
    RunOptions,
)

from helpers import CAPTIONS, randomise_zeros, tiny_pipeline, tiny_tokenizer


def shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)


def help_entries(command: str, monkeypatch, capsys) -> list[str]:
    """``--help`` as one string per option: its flags, then its help text."""
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapped help lines
    with pytest.raises(SystemExit):
        main([command, "--help"])
    entries: list[str] = []
    for line in capsys.readouterr().out.splitlines():
        if line.strip().startswith("-"):
            entries.append(line.strip())
        elif entries and line.startswith("    ") and line.strip():
            entries[-1] += " " + line.strip()
    return entries


def option_fields(cls: type, prefix: str = ""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name == "cycle":
            yield from option_fields(CycleConfig, f.metadata["prefix"])
            continue
        name = f.metadata.get("flag") or f.name
        yield (f"{prefix}_{name}" if prefix else name), f


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_option_field_with_its_default(command, monkeypatch, capsys):
    lines = help_entries(command, monkeypatch, capsys)
    for section, cls in COMMANDS[command].items():
        for name, f in option_fields(cls):
            flag = spellings(name)[0]
            line = next(
                (ln for ln in lines if ln.strip().startswith(flag + " ") or ln.strip().startswith(flag + ",")), None
            )
            assert line is not None, f"{command}: no flag {flag} for {section}.{f.name}"
            assert spellings(name)[-1] in line  # the underscore spelling too
            default = RECIPE_DEFAULTS.get(command, {}).get(section, {}).get(f.name, default_of(f))  # a recipe's own
            expected = "(required)" if default is dataclasses.MISSING else f"(default: {shown(default)})"
            assert line.rstrip().endswith(expected), (flag, line)


def dry_run(*args: str, capsys) -> dict:
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_seed_spellings_are_aliases_of_the_options_they_name(capsys):
    seeds = [
        ("--denoising_type", "dit", "model", "backbone"),
        ("--learning_rate", "0.0001", "run", "lr"),
        ("--weight_decay", "0.01", "run", "wd"),
        ("--num_timesteps", "500", "model", "num_train_timesteps"),
        ("--vocab_size", "333", "model", "vocab_size"),
        ("--text_emb_dim", "96", "model", "text_width"),
        ("--latent_dim", "4", "model", "latent_channels"),
        ("--dit_hidden_size", "192", "model", "dit_hidden_size"),
        ("--dit_depth", "12", "model", "dit_depth"),
        ("--dit_num_heads", "12", "model", "dit_num_heads"),
        ("--dit_patch_size", "2", "model", "dit_patch_size"),
        ("--dataset", "somewhere", "data", "data"),
        ("--batch_size", "4", "run", "batch_size"),
        ("--epochs", "10", "run", "epochs"),
    ]
    args = ["train", "--data", "d", "--out", "r", "--steps", "1"]
    for spelling, value, _, _ in seeds:
        args += [spelling, value]
    options = dry_run(*args, capsys=capsys)
    for spelling, value, section, field in seeds:
        got = options[section][field]
        assert str(got) == value or got == float(value), (spelling, got)
    unet = dry_run("train", "--data", "d", "--out", "r", "--steps", "1", "--unet_base_channels", "32", capsys=capsys)
    assert unet["model"]["unet_base_channels"] == 32


def test_architecture_fields_change_the_named_size_one_at_a_time():
    tok = tiny_tokenizer()
    unet = ModelOptions(model_size="small", unet_base_channels=32).build(tok, None, 16)["denoiser"]
    assert isinstance(unet, UNet) and unet.config.block_channels == (32, 64)  # small is (64, 128)
    dit = ModelOptions(backbone="dit", model_size="tiny", dit_depth=2, dit_num_heads=2, dit_patch_size=2)
    net = dit.build(tok, None, 16)["denoiser"]
    assert isinstance(net, DiT) and (net.config.depth, net.config.num_heads, net.config.patch_size) == (2, 2, 2)
    assert net.config.hidden_size == 2 * 32  # heads alone keep tiny's head width (128 / 4)
    with pytest.raises(ValueError, match="--backbone dit"):
        ModelOptions(dit_depth=3).build(tok, None, 16)
    joint = ModelOptions(backbone="dit", model_size="tiny", dit_joint_text=True).build(tok, None, 16)["denoiser"]
    assert joint.config.joint_text and joint.context_embedder is not None and net.context_embedder is None
    with pytest.raises(ValueError, match="--dit-joint-text is an option of --backbone dit"):
        ModelOptions(dit_joint_text=True).build(tok, None, 16)
    with pytest.raises(ValueError, match="multiple of its 5 heads"):
        ModelOptions(backbone="dit", model_size="tiny", dit_hidden_size=64, dit_num_heads=5).build(tok, None, 16)
    with pytest.raises(ValueError, match="--latent-channels 4"):
        ModelOptions(latent_channels=4).build(tok, None, 16)  # pixel space has 3


def test_config_file_reproduces_a_run_and_flags_override_it(tmp_path, monkeypatch, capsys):
    data = write_folder(tmp_path / "data", n=4)
    args = ["train", "--data", str(data), "--out", "run", "--steps", "1", "--batch-size", "4", *TINY_FLAGS]
    args += ["--seed", "3", "--sample-prompt", "a red square", "--cycle-t-max", "10", "--captioner", "nowhere"]
    monkeypatch.chdir(tmp_path)
    expected = dry_run(*args, capsys=capsys)
    args = [a for a in args if a not in ("--cycle-t-max", "10", "--captioner", "nowhere")]
    assert run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 0
    saved = tmp_path / "run" / "options.yaml"
    written = yaml.safe_load(saved.read_text())
    assert written["run"]["seed"] == 3 and written["model"]["sample_prompts"] == ["a red square"]
    assert written["model"]["vocab_size"] == 300 and written["data"]["data"] == str(data)
    assert dry_run("train", "--config", str(saved), capsys=capsys) == written  # reproduced exactly
    expected["model"]["cycle"]["t_max"] = None
    expected["model"]["captioner"] = None
    assert written == expected  # the run resolved what the flags said
    again = dry_run("train", "--config", str(saved), "--lr", "0.5", "--out", "other", capsys=capsys)
    assert again["run"]["lr"] == 0.5 and again["run"]["out"] == "other" and again["model"] == written["model"]
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"run": {"steps": 7}, "model": {"captioner": "cap", "cycle": {"k": 1}}}))
    from_json = dry_run("train", "--config", str(json_config), "--data", "d", "--out", "o", capsys=capsys)
    assert from_json["run"]["steps"] == 7 and from_json["model"]["cycle"]["k"] == 1


@pytest.mark.parametrize(
    "config,message",
    [
        ({"run": {"bogus": 1}}, "unknown option run.bogus"),
        ({"modle": {}}, "unknown section 'modle'"),
        ({"run": {"batch_size": "big"}}, "run.batch_size must be an integer"),
        ({"model": {"cycle": {"weight": "heavy"}}}, "model.cycle.weight must be a number"),
        ({"model": {"sample_prompts": "a red circle"}}, "model.sample_prompts must be a list of strings"),
        ({"data": {"image_size": 16}}, "--data is required"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["train", "--config", str(path), "--out", "r", "--steps", "1"]
    if "--data" not in message:
        args += ["--data", "d"]
    assert run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "cyclediffusion" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_seed_readme_commands_train_and_sample(tmp_path, monkeypatch):
    """Seeds 001 and 003, shortened to a few steps on a local folder (no hub at run time)."""
    data, data_64 = str(write_folder(tmp_path / "data", n=4)), str(write_folder(tmp_path / "data64", n=64))
    small = ["--image_size", "16", "--vocab_size", "300", "--log_every", "1"]
    seed_001_unet = ["--denoising_type", "unet", "--epochs", "10", "--batch_size", "4", "--learning_rate", "1e-4"]
    seed_001_dit = [*seed_001_unet[:1], "dit", *seed_001_unet[2:], "--dit_depth", "12", "--dit_num_heads", "12"]
    runs = {
        "unet": ["train", "--dataset", data, "--out", "unet", *seed_001_unet, *small],
        # 12 heads of the small DiT's head width would make it 768 wide: narrowed to keep the test light
        "dit": [
            "train",
            "--dataset",
            data,
            "--out",
            "dit",
            *seed_001_dit,
            *small,
            "--steps",
            "1",
            "--dit_hidden_size",
            "48",
        ],
        "ddpm": ["train", "--dataset", data_64, "--out", "ddpm", "--steps", "2", "--scheduler", "ddpm", *small],
        "flow": ["train", "--dataset", data_64, "--out", "flow", "--steps", "2", "--scheduler", "flow", *small],
    }
    for name, args in runs.items():
        assert run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 0, name
    steps = [json.loads(line)["step"] for line in (tmp_path / "unet/logs/metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10  # 10 epochs of 4 images at batch 4
    dit = Text2ImagePipeline.from_pretrained(tmp_path / "dit").denoiser
    assert (dit.config.depth, dit.config.num_heads, dit.config.hidden_size) == (12, 12, 48)
    for scheduler in ("ddpm", "flow"):
        prompt = ["--prompt", "A small cabin in the woods", "--steps", "3", "--out", f"{scheduler}.png"]
        sample = ["sample", "--model", scheduler, *prompt, "--scheduler", scheduler]
        assert run_cli(*sample, cwd=tmp_path, monkeypatch=monkeypatch) == 0
        assert Image.open(tmp_path / f"{scheduler}.png").size == (16, 16)
    wrong = ["sample", "--model", "flow", "--prompt", "x", "--steps", "2", "--scheduler", "ddpm"]
    assert run_cli(*wrong, cwd=tmp_path, monkeypatch=monkeypatch) == 2


def test_pipelines_load_run_folders_and_use_the_stored_guidance(tmp_path):
    pipe = tiny_pipeline("unet", "ddpm", size=8, prediction_type="epsilon")
    randomise_zeros(pipe.denoiser)  # zero-initialised outputs would not depend on the prompt
    pipe.guidance_scale = 2.5
    pipe.save_pretrained(tmp_path / "run" / "model")
    index = json.loads((tmp_path / "run" / "model" / "model_index.json").read_text())
    assert index["_guidance_scale"] == 2.5
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "run")  # a run folder, as the CLI takes
    assert loaded.guidance_scale == 2.5

    def draw(**kw):
        return loaded("a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kw).images

    default, explicit, other = draw(output_type="pt"), draw(output_type="pt", guidance_scale=2.5), None
    other = draw(output_type="pt", guidance_scale=1.0)
    assert torch.equal(default, explicit) and not torch.equal(default, other)


def corrupt(folder: Path, how: str) -> None:
    component = folder / "denoiser"
    if how == "empty config":
        (component / "config.json").write_text("")
    elif how == "bin weights":
        (component / "model.safetensors").rename(component / "pytorch_model.bin")
    elif how == "wrong weights":
        weights = load_file(str(component / "model.safetensors"))
        from safetensors.torch import save_file

        save_file({k: v for k, v in list(weights.items())[1:]}, str(component / "model.safetensors"))


@pytest.mark.parametrize("how,message", [("empty config", "not valid JSON"), ("bin weights", "pickle"),
                                         ("wrong weights", "cannot load the UNet")])  # fmt: skip
def test_malformed_model_folder_is_one_line_and_never_unpickled(tmp_path, monkeypatch, capsys, how, message):
    pipe = tiny_pipeline("unet", "ddpm", size=8, prediction_type="epsilon")
    pipe.save_pretrained(tmp_path / "m")
    corrupt(tmp_path / "m", how)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    assert (
        run_cli("sample", "--model", "m", "--prompt", "x", "--steps", "1", cwd=tmp_path, monkeypatch=monkeypatch) == 2
    )
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "cyclediffusion" in line]
    assert len(lines) == 1 and message in lines[0] and "denoiser" in lines[0] and "Traceback" not in err, err


def test_more_devices_than_the_machine_has_is_one_line(tmp_path, monkeypatch, capsys):
    too_many = str((os.cpu_count() or 1) + 7)
    args = ["train", "--data", "d", "--out", "r", "--steps", "1", "--devices", too_many, "--accelerator", "cpu"]
    assert run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--devices {too_many}" in err[0] and "CPU cores" in err[0], err
    assert not (tmp_path / "r").exists()


def folder_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(tmp_path, monkeypatch, capsys):
    data = write_folder(tmp_path / "data", n=4)
    common = ["train", "--data", str(data), "--out", "run", "--batch-size", "4", *TINY_FLAGS, "--no-progress"]
    assert run_cli(*common, "--steps", "2", cwd=tmp_path, monkeypatch=monkeypatch) == 0
    export, ckpt = tmp_path / "run" / "model", tmp_path / "run" / "checkpoints" / "last.ckpt"
    before, ckpt_before = folder_digest(export), ckpt.read_bytes()
    capsys.readouterr()
    diverge = [*common, "--steps", "40", "--lr", "1e6", "--grad-clip", "0"]
    assert run_cli(*diverge, cwd=tmp_path, monkeypatch=monkeypatch) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "cyclediffusion" in line]
    assert len(err) == 1 and re.search(r"not finite at step \d+|loss is (nan|inf) at step \d+", err[0]), err
    step = int(re.search(r"at step (\d+)", err[0]).group(1))
    assert 2 <= step < 40
    assert folder_digest(export) == before  # the export is the last good one
    state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own checkpoint, not a user's file
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert state["global_step"] == 2 and ckpt.read_bytes() == ckpt_before
    assert run_cli(*common, "--steps", str(step + 2), "--lr", "1e-3", cwd=tmp_path, monkeypatch=monkeypatch) == 0
    weights = load_file(str(export / "denoiser" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_progress_bar_shows_the_time_budget_not_epochs(tmp_path, monkeypatch, capsys):
    data = write_folder(tmp_path / "data", n=4)
    args = ["train", "--data", str(data), "--out", "run", "--batch-size", "4", *TINY_FLAGS, "--minutes", "0.03"]
    assert run_cli(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 0
    err = "".join(capsys.readouterr())  # Lightning's bar writes to stdout
    assert "of 0:01" in err and "step=" in err and "Epoch" not in err and "-2" not in err, err[-2000:]
    assert run_cli(*args[:-2], "--steps", "3", "--out", "run2", cwd=tmp_path, monkeypatch=monkeypatch) == 0
    err = "".join(capsys.readouterr())
    assert "3/3" in err and "Epoch" not in err, err[-2000:]


def test_one_preprocessing_for_training_and_captioning(tmp_path):
    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (12, 20, 3)), rng.choice([0, 255], (12, 20, 1))], -1)
    image = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    expected = preprocess_image(image, 8)
    assert (expected == 1).any()  # transparent pixels became white
    tokenizer = tiny_tokenizer()
    pipe = CaptionPipeline(tokenizer, tiny_captioner(tokenizer, image_size=8))
    assert torch.equal(pipe.preprocess(image)[0].cpu(), expected)
    image.save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": CAPTIONS[0]}) + "\n")
    from cyclediffusion.training.data import load_captioned_images

    assert torch.equal(load_captioned_images(str(tmp_path), 8)[0]["pixels"], expected)


def test_components_provide_the_declared_interfaces():
    pipe = tiny_pipeline("unet", "ddpm", vae=True, size=16)
    assert isinstance(pipe.denoiser, Denoiser) and isinstance(pipe.vae, LatentCodec)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.latent_channels == pipe.denoiser.in_channels
    assert pipe.denoiser.takes_pooled == (pipe.denoiser.config.pooled_dim is not None)


def test_option_classes_build_from_python_as_from_the_cli(capsys):
    options = dry_run("train", "--data", "d", "--out", "r", "--steps", "5", capsys=capsys)
    built = {"data": DataOptions(data="d"), "run": RunOptions(out="r", steps=5), "model": ModelOptions()}
    from cyclediffusion.options import to_plain

    assert options == {k: to_plain(v) for k, v in built.items()}
