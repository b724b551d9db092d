"""Optimisers: Muon for the hidden matrices (batched, equal to torch's), AdamW for the rest, as one optimiser that
Lightning, the LR schedule and checkpoints drive; training with it learns and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cyclediffusion.training import DataOptions, ModelOptions, train_text2image
from cyclediffusion.training.modules import OptimConfig
from cyclediffusion.training.optimizers import BatchedMuon, Combined, build_optimizer, muon_matrices
from tests.test_training import final_weights, metrics, tiny_run, write_folder


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_batched_muon_equals_torch_muon(nesterov, adjust):
    """Same-shaped matrices orthogonalised in one batch give torch.optim.Muon's weights and state, bit for bit."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 8), (8, 8), (24, 8), (8, 24), (24, 8), (16, 32)]  # square, tall and wide, repeated shapes
    ours = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    a, b = BatchedMuon(ours, **kw, ns_dtype=torch.bfloat16), torch.optim.Muon(theirs, **kw)
    for _ in range(4):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
        torch.testing.assert_close(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"], atol=0, rtol=0)
    assert all((p - p0).abs().max() > 1e-3 for p, p0 in zip(ours, start, strict=True))  # the steps moved them


@pytest.mark.parametrize("native", [True, False])
def test_muon_orthogonalises_in_bf16_only_where_the_cpu_computes_it(native, monkeypatch):
    """Without native bf16 (an AVX2 CPU, where emulated bf16 is ~40x slower) the Newton-Schulz iterations run in
    fp32; with it, in bf16 as torch's Muon does."""
    from cyclediffusion.training import optimizers

    monkeypatch.setattr(
        optimizers, "choose_dtype", lambda requested, device: (torch.bfloat16 if native else torch.float32, "")
    )
    optimizers._native_dtype.cache_clear()
    seen = []
    monkeypatch.setattr(optimizers, "newton_schulz", lambda x, *a: seen.append(x.dtype) or x)
    p = nn.Parameter(torch.randn(16, 16))
    p.grad = torch.randn(16, 16)
    BatchedMuon([p], lr=0.01).step()
    optimizers._native_dtype.cache_clear()
    assert seen == [torch.bfloat16 if native else torch.float32]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 32)
        self.conv = nn.Conv2d(3, 32, 1)
        self.hidden = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 4)  # narrow: an output layer


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    toy = Toy()
    params = list(toy.parameters())
    assert muon_matrices(toy) == [toy.hidden.weight]
    opt = build_optimizer("muon", toy, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999), fused=False)
    assert isinstance(opt, Combined)
    muon, adamw = opt.optimizers
    assert isinstance(muon, BatchedMuon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = [p for g in muon.param_groups for p in g["params"]]
    in_adamw = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == [toy.hidden.weight]
    assert len(in_muon) + len(in_adamw) == len(params)  # every parameter, once
    assert in_adamw[id(toy.embed.weight)] == in_adamw[id(toy.head.weight)] == 0.1  # matrices decay
    assert in_adamw[id(toy.hidden.bias)] == in_adamw[id(toy.norm.weight)] == 0.0
    # AdamW alone keeps its old grouping
    plain = build_optimizer("adamw", toy, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999), fused=False)
    assert isinstance(plain, torch.optim.AdamW) and sum(len(g["params"]) for g in plain.param_groups) == len(params)
    with pytest.raises(ValueError, match="unknown optimiser 'sgd'"):
        build_optimizer("sgd", toy, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), fused=False)
    with pytest.raises(ValueError, match="unknown optimiser"):
        OptimConfig(optimizer="sgd")


def test_the_lr_schedule_reaches_both_optimisers_and_the_state_round_trips():
    toy = Toy()
    opt = build_optimizer("muon", toy, 1e-2, 0.0, (0.9, 0.999), fused=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, OptimConfig(lr=1e-2, warmup_steps=4).factor)
    assert [g["lr"] for o in opt.optimizers for g in o.param_groups] == pytest.approx([2.5e-3] * 3)
    x = torch.randint(0, 10, (5,))
    for _ in range(3):
        opt.zero_grad()
        toy.head(toy.norm(toy.hidden(toy.embed(x)))).square().mean().backward()
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2] * 3)
    saved = opt.state_dict()
    other = build_optimizer("muon", toy, 1e-2, 0.0, (0.9, 0.999), fused=False)
    saved["param_groups"][0]["lr"] = 5e-3  # a resume at another rate rewrites the saved groups
    other.load_state_dict(saved)
    assert other.optimizers[0].param_groups[0]["lr"] == 5e-3
    assert other.param_groups[0] is other.optimizers[0].param_groups[0]  # a scheduler still reaches the inner groups
    buf = opt.optimizers[0].state[toy.hidden.weight]["momentum_buffer"]
    torch.testing.assert_close(other.optimizers[0].state[toy.hidden.weight]["momentum_buffer"], buf)
    with pytest.raises(ValueError, match="another --optimizer"):
        other.load_state_dict(torch.optim.AdamW(toy.parameters()).state_dict())


def dit_model() -> ModelOptions:
    return ModelOptions(backbone="dit", model_size="tiny", text_width=32, text_layers=1, vocab_size=300)


def test_training_with_muon_learns_and_resumes_exactly(tmp_path):
    data = DataOptions(data=str(write_folder(tmp_path / "data")), image_size=16)
    run = dict(optimizer="muon", lr=3e-3, ema_decay=0, warmup=5)  # resumed inside the warmup: the LR still moves
    straight = train_text2image(data, tiny_run(tmp_path / "a", steps=6, **run), dit_model())
    train_text2image(data, tiny_run(tmp_path / "b", steps=3, **run), dit_model())
    train_text2image(data, tiny_run(tmp_path / "b", steps=6, **run), dit_model())  # resumes
    a, b = final_weights(straight.parent), final_weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    # and it is not AdamW: the same run with AdamW ends elsewhere
    adamw = train_text2image(data, tiny_run(tmp_path / "c", steps=6, lr=3e-3, ema_decay=0), dit_model())
    assert any(not torch.allclose(v, final_weights(adamw.parent)[k]) for k, v in a.items())
    assert "optimizer: muon" in (tmp_path / "a" / "options.yaml").read_text()


def test_muon_training_loss_falls(tmp_path):
    data = DataOptions(data=str(write_folder(tmp_path / "data", n=32)), image_size=16)
    out = tmp_path / "run"
    train_text2image(data, tiny_run(out, steps=40, optimizer="muon", lr=3e-3, warmup=5, batch_size=8), dit_model())
    losses = [r["train/loss"] for r in metrics(out)]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
