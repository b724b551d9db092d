"""``auto`` precision: bf16 where the hardware has it natively (CUDA, AVX512_BF16, AMX), fp32 elsewhere, with the
reason in the run's log and options.yaml; the same choice of dtype for sampling."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from test_training import tiny_model, tiny_run, write_folder

from cyclediffusion.precision import choose_dtype, choose_precision
from cyclediffusion.training import DataOptions, train_text2image

from helpers import tiny_pipeline


@pytest.fixture
def cpu(monkeypatch):
    """A CPU of the chosen kind, and no GPU."""

    def make(avx512_bf16: bool = False, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return make


def test_auto_is_bf16_only_where_it_is_native(cpu, monkeypatch):
    cpu()
    precision, why = choose_precision("auto")
    assert precision == "32" and "no native bf16" in why
    assert choose_dtype("auto", "cpu")[0] == torch.float32
    cpu(avx512_bf16=True)
    assert choose_precision("auto") == ("bf16-mixed", "auto: this CPU has native bf16 (AVX512_BF16)")
    assert choose_dtype("auto", "cpu")[0] == torch.bfloat16
    cpu(amx=True)
    assert "AMX" in choose_precision("auto")[1]
    assert choose_precision("16-mixed") == ("16-mixed", "asked for")
    assert choose_dtype("float16", "cpu") == (torch.float16, "asked for")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "an old GPU")
    assert choose_precision("auto") == ("32", "auto: an old GPU has no bf16")
    assert choose_precision("auto", accelerator="cpu")[0] == "bf16-mixed"  # the CPU of this run has AMX
    with pytest.raises(ValueError, match="unknown precision"):
        choose_precision("8-bit")
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("int8", "cpu")


def test_the_run_says_what_auto_chose(tmp_path, cpu, caplog):
    cpu()
    data = DataOptions(data=str(write_folder(tmp_path / "data")), image_size=16)
    with caplog.at_level(logging.INFO, logger="cyclediffusion"):
        train_text2image(data, tiny_run(tmp_path / "run", steps=1), tiny_model())
    text = (tmp_path / "run" / "options.yaml").read_text()
    assert yaml.safe_load(text)["run"]["precision"] == "auto"
    assert text.rstrip().splitlines()[-1].startswith("# precision auto -> 32 (auto: this CPU has no native bf16")
    assert any("precision 32 (auto" in r.getMessage() for r in caplog.records)


def test_cli_samples_in_bfloat16(tmp_path, capsys):
    from PIL import Image

    from cyclediffusion.cli import main

    torch.manual_seed(0)
    tiny_pipeline("unet", "flow", vae=True).save_pretrained(tmp_path / "model")
    args = ["sample", "--model", str(tmp_path / "model"), "--prompt", "a red square", "--steps", "2"]
    assert main([*args, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16.png")]) == 0
    assert main([*args, "--dtype", "float32", "--out", str(tmp_path / "fp32.png")]) == 0
    a, b = Image.open(tmp_path / "bf16.png"), Image.open(tmp_path / "fp32.png")
    assert a.size == b.size == (16, 16)


def test_cpu_attention_under_bf16_autocast_attends_in_fp32(monkeypatch):
    """Training in bf16 on a CPU, attention runs in fp32 on the bf16 inputs (torch's bf16 CPU flash-attention backward
    is 5-10x slower for short sequences, ``benchmarks/attention_bf16.py``); the result and gradients come back in
    bf16, and inference keeps the bf16 kernel."""
    import torch.nn.functional as F

    from cyclediffusion.models import layers

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        calls.append(q.dtype)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.rand(2, 1, 1, 64, generator=g) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layers.scaled_dot_product_attention(q, k, v, mask)
    assert calls == [torch.float32] and out.dtype == torch.bfloat16
    expected = real(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    assert torch.equal(out, expected)
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layers.scaled_dot_product_attention(q, k, v, mask)
    assert calls == [torch.float32, torch.bfloat16]
    long = [torch.randn(1, 1, layers.FP32_ATTENTION_TOKENS + 1, 8).bfloat16().requires_grad_() for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers.scaled_dot_product_attention(*long)
    assert calls[-1] == torch.bfloat16  # long sequences: the bf16 kernel is as fast
