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


def test_cpu_attention_trains_in_bf16_through_explicit_attention(monkeypatch):
    """Training in bf16 on a CPU, short sequences attend through bf16 matmuls and softmax with autograd (torch's bf16
    CPU flash-attention backward is 2.5-6x slower there, ``benchmarks/attention_bf16.py``): no call to torch's kernel,
    the padding mask honoured, results and gradients in bf16 and within bf16 rounding of fp32 attention; inference and
    long sequences keep torch's kernel."""
    import torch.nn.functional as F

    from cyclediffusion.models import layers

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        calls.append(q.dtype)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 2, 64, 16, generator=g) for _ in range(3)]
    q, k, v = (t.bfloat16().requires_grad_() for t in base)
    mask = torch.rand(2, 1, 1, 64, generator=g) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layers.scaled_dot_product_attention(q, k, v, mask)
    assert calls == [] and out.dtype == torch.bfloat16
    leaves = [t.clone().requires_grad_() for t in base]
    expected = real(*leaves, attn_mask=mask)
    torch.testing.assert_close(out.float(), expected, atol=0.03, rtol=0.02)
    v_hidden = base[2].clone()
    v_hidden[~mask[:, :, 0, :, None].expand(-1, 2, -1, 16)] += 100.0  # values the mask hides: no effect
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = layers.scaled_dot_product_attention(q, k, v_hidden.bfloat16(), mask)
        none_seen = layers.scaled_dot_product_attention(q, k, v, torch.zeros_like(mask))
    assert torch.equal(hidden, out)
    assert torch.equal(none_seen, torch.zeros_like(none_seen))  # all keys masked: zeros, as torch's kernel gives
    out.float().square().sum().backward()
    expected.square().sum().backward()
    assert q.grad.dtype == torch.bfloat16
    for ours, ref in zip((q, k, v), leaves):
        assert torch.nn.functional.cosine_similarity(ours.grad.float().flatten(), ref.grad.flatten(), dim=0) > 0.999
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layers.scaled_dot_product_attention(q, k, v, mask)
    assert calls == [torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal = layers.scaled_dot_product_attention(q, k, v, causal=True)  # the text encoder's
    assert calls == [torch.bfloat16]
    torch.testing.assert_close(causal.float(), real(*base, is_causal=True), atol=0.03, rtol=0.02)
    long = [torch.randn(1, 1, layers.EXPLICIT_ATTENTION_TOKENS + 1, 8).bfloat16().requires_grad_() for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers.scaled_dot_product_attention(*long)
    assert calls == [torch.bfloat16, torch.bfloat16]  # long sequences: torch's kernel (explicit scores grow as N^2)
