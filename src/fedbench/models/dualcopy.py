"""DualCopy forward for FedSQ: a frozen STRUCTURAL copy decides every gate's regime for each input; the
QUANTITATIVE copy (the trained weights) runs with those regimes.

Every ReLU / ReLU6 module of the model is replaced by a `RegimeGate`. One forward of the model with the
structural parameters records, per sample and unit, which regime each gate is in (ReLU: off / linear;
ReLU6: off / linear / saturated); a second forward with the quantitative parameters applies them:

    ReLU :  a = m * z                  m = 1[z_S > 0]
    ReLU6:  a = lin * z + 6 * sat      lin = 1[0 < z_S < 6], sat = 1[z_S >= 6]

where z_S is the structural copy's own pre-activation at that gate (in a ResNet the post-addition gate
sees the structural copy's own sum). Optionally every MaxPool2d becomes a `PoolGate` too: the
quantitative copy then takes, in each window, the value at the position the structural copy's max picked.
Masks are recomputed for every batch, never cached per sample.
With equal copies the DualCopy forward equals the plain forward exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedbench.engine.functional import per_sample_loss


class RegimeGate(nn.Module):
    """A ReLU/ReLU6 that can record its regime (structural pass) or replay a recorded one."""

    def __init__(self, cap: float | None):
        super().__init__()
        self.cap = cap  # None: ReLU, 6.0: ReLU6
        self.mode = "plain"
        self.tape: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "plain":
            return torch.relu(z) if self.cap is None else z.clamp(0.0, self.cap)
        if self.mode == "record":
            on = z > 0
            sat = z >= self.cap if self.cap is not None else None
            lin = on & ~sat if sat is not None else on
            self.tape.append((lin, sat))
            return torch.relu(z) if self.cap is None else z.clamp(0.0, self.cap)
        lin, sat = self.tape.pop(0)
        out = z * lin.to(z.dtype)
        if sat is not None:
            out = out + self.cap * sat.to(z.dtype)
        return out


class PoolGate(nn.Module):
    """A MaxPool2d whose selected positions come from the structural pass (argmax gating)."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool
        self.mode = "plain"
        self.tape: list | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "plain":
            return self.pool(z)
        p = self.pool
        if self.mode == "record":
            out, idx = F.max_pool2d(z, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode,
                                    return_indices=True)
            self.tape.append(idx)
            return out
        idx = self.tape.pop(0)  # [N, C, H', W'] flat positions within each (N, C) plane
        return z.flatten(2).gather(2, idx.flatten(2)).view_as(idx)


def install_gates(model: nn.Module, kinds: tuple[str, ...] = ("relu", "relu6"),
                  max_pool: bool = False) -> list[nn.Module]:
    """Replace ReLU / ReLU6 (and with `max_pool`, MaxPool2d) modules in place by gates; returns them."""
    gates: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6) and "relu6" in kinds:
                gate = RegimeGate(6.0)
            elif isinstance(child, nn.ReLU) and "relu" in kinds:
                gate = RegimeGate(None)
            elif isinstance(child, nn.MaxPool2d) and max_pool:
                gate = PoolGate(child)
            else:
                visit(child)
                continue
            setattr(parent, name, gate)
            gates.append(gate)

    visit(model)
    return gates


@contextmanager
def gate_mode(gates: list[nn.Module], mode: str, tape: list):
    for g in gates:
        g.mode, g.tape = mode, tape
    try:
        yield
    finally:
        for g in gates:
            g.mode, g.tape = "plain", None


def dual_forward(model: nn.Module, gates: list[nn.Module], struct: tuple[dict, dict], quant: tuple[dict, dict],
                 x: torch.Tensor) -> torch.Tensor:
    """Quantitative outputs under the structural copy's gating regimes. The structural pass is
    constant (no gradient reaches the structural parameters)."""
    tape: list = []
    was_training = model.training
    model.eval()  # the structural copy always uses its pretrained BatchNorm statistics
    try:
        with torch.no_grad(), gate_mode(gates, "record", tape):
            functional_call(model, struct, (x,))
    finally:
        model.train(was_training)
    # every gate records once per forward, in call order; with one shared tape the replay pops in the
    # same order, which also covers a module used twice
    with gate_mode(gates, "replay", tape):
        return functional_call(model, quant, (x,))


def make_dual_loss_fn(model: nn.Module, gates: list[nn.Module], struct_params: dict, struct_buffers: dict,
                      task: str) -> Callable[..., Any]:
    """Same contract as engine.functional.make_loss_fn, for the DualCopy forward."""

    def loss_fn(params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        bufs = {k: v.clone() for k, v in buffers.items()}
        out = dual_forward(model, gates, (struct_params, struct_buffers), (params, bufs), x)
        per = per_sample_loss(out, y, task).to(w.dtype)
        loss = (per * w).sum() / w.sum().clamp_min(1.0)
        return loss, (loss.detach(), bufs)

    return loss_fn
