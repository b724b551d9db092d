"""The optimisers a run can train with: AdamW, or Muon for the hidden layers' weight matrices with AdamW for the rest.

Muon (Jordan et al. 2024; ``torch.optim.Muon``) replaces each weight matrix's momentum update by its nearest
semi-orthogonal matrix (a few Newton-Schulz iterations), so that every direction of the layer moves at the same
rate. It is defined for matrices only, and meant for the hidden layers: embeddings, convolutions, norms, biases and
narrow output projections keep AdamW. The two run as one :class:`Combined` optimiser, so that Lightning, the
learning-rate schedule, gradient clipping and checkpoints see a single optimiser.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..precision import choose_dtype

OPTIMIZERS = ("adamw", "muon")
MUON_MIN_WIDTH = 16  # a linear layer narrower than this on either side (an output head, say) keeps AdamW


def muon_matrices(module: nn.Module) -> list[nn.Parameter]:
    """The weights Muon trains in ``module``: the trainable ones of ``nn.Linear`` layers at least
    :data:`MUON_MIN_WIDTH` wide on both sides."""
    return [
        m.weight
        for m in module.modules()
        if isinstance(m, nn.Linear) and min(m.weight.shape) >= MUON_MIN_WIDTH and m.weight.requires_grad
    ]


def evaluate(closure: Callable[[], Any] | None) -> Any:
    """An optimiser step's closure (Lightning's forward and backward), run with gradients on; None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz iterations of all same-shaped matrices in one batched product.

    The maths, the state (``momentum_buffer``) and the options are Muon's; only the order of the work changes: torch
    orthogonalises matrix after matrix (58 ms a step for the demo's 76 small matrices on 2 CPU cores), this stacks
    those of one shape (a few shapes in a transformer) and runs each iteration once per shape (25 ms).

    The iterations run in ``ns_dtype``: torch's bf16 where the device computes bf16 natively (a GPU, or a CPU with
    AVX512_BF16 or AMX; ``None``, the default, asks :func:`~cyclediffusion.precision.choose_dtype`), fp32 elsewhere,
    where emulated bf16 made them 40x slower (an AVX2 CPU: 2.5 s instead of 60 ms for four 384 x 384 matrices).
    """

    def __init__(self, params: Any, *args: Any, ns_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate(closure)
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            momentum, lr, decay = group["momentum"], float(group["lr"]), group["weight_decay"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape), []).append(i)
            dtype = self.ns_dtype or _native_dtype(params[0].device)
            for (rows, cols), index in by_shape.items():
                tall = rows > cols
                stack = torch.stack([updates[i].mT if tall else updates[i] for i in index]).to(dtype)
                ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
                scaled = lr * _muon_lr_ratio(group["adjust_lr_fn"], rows, cols)
                targets = [params[i] for i in index]
                if decay:
                    torch._foreach_mul_(targets, 1 - lr * decay)
                torch._foreach_add_(targets, [o.mT if tall else o for o in ortho.unbind(0)], alpha=-scaled)
        return loss


@functools.cache
def _native_dtype(device: torch.device) -> torch.dtype:
    """bf16 where ``device`` computes it natively, else fp32 (the probe runs once per device)."""
    return choose_dtype("auto", device)[0]


def newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration on a batch of wide matrices (B, m, n), m <= n: each scaled to unit
    Frobenius norm, then ``x <- a x + (b A + c A^2) x`` with ``A = x x^T``; singular values end near 1."""
    a, b, c = coefficients
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _muon_lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Muon's learning-rate factor for a (rows, cols) matrix (``torch.optim.Muon``'s ``adjust_lr_fn``)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class Combined(torch.optim.Optimizer):
    """Several optimisers stepped as one.

    ``param_groups`` are the inner optimisers' own group dictionaries (so a learning-rate scheduler that sets a
    group's ``lr`` sets it where the step reads it); ``step`` evaluates the closure once (Lightning's forward and
    backward) and then steps every inner optimiser; the state dict holds each inner one's.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("Combined needs at least one optimiser")
        self.optimizers = list(optimizers)
        super().__init__([p for opt in self.optimizers for g in opt.param_groups for p in g["params"]], {})
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate(closure)
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Each inner optimiser's state dict, and the learning rates of all groups in order (``param_groups``, which
        a resumed run may rewrite before loading)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": {}, "param_groups": groups, "inner": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("inner")
        if inner is None or len(inner) != len(self.optimizers):
            raise ValueError("this checkpoint's optimiser state is not this run's (another --optimizer?)")
        for opt, state in zip(self.optimizers, inner, strict=True):
            opt.load_state_dict(state)  # which gives each inner optimiser new group dictionaries: share those
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: saved[k] for k in ("lr", "initial_lr") if k in saved})


def build_optimizer(
    name: str,
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    fused: bool,
) -> torch.optim.Optimizer:
    """``name``'s optimiser for the trainable parameters of ``module``.

    AdamW decays matrices (``ndim >= 2``) by ``weight_decay`` and nothing else. With ``muon`` the hidden layers'
    weight matrices (:func:`muon_matrices`) go to Muon at the same learning rate, its update scaled to the RMS of
    AdamW's (``adjust_lr_fn="match_rms_adamw"``), and the rest to AdamW as above.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimiser {name!r}; choose from {', '.join(OPTIMIZERS)}")
    params = [p for p in module.parameters() if p.requires_grad]
    matrices = {id(p) for p in muon_matrices(module)} if name == "muon" else set()
    rest = [p for p in params if id(p) not in matrices]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused or None)
    if not matrices:
        return adamw
    muon = BatchedMuon(
        [p for p in params if id(p) in matrices], lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    return Combined([muon, adamw])
