"""One functional optimizer for clients and servers, and the client learning rate over rounds.

    opt = Optimizer("adam", lr=0.01, beta1=0.9, beta2=0.99, eps=1e-3)
    state = opt.init(params)                       # a tree of tensors (checkpointed with its owner)
    state, params = opt.apply(grads, state, params)

`apply` is functional (new tensors) under vmap and torch.compile, and updates `params` in place
in plain eager code when `inplace=True` (the sequential executor owns its local copies). A server
passes the pseudo-gradient -(mean client delta), so every rule below is the one of "Adaptive
Federated Optimization" (Reddi et al., 2021, Algorithm 2), server rate eta, beta1, beta2, tau = eps:

    sgd      x -= lr (g + wd x); with momentum mu: m = mu m + g, x -= lr m  (FedAvg, FedAvgM)
    adagrad  m = b1 m + (1-b1) g;  v = v + g^2;                       x -= lr m / (sqrt(v) + eps)
    adam     m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;             x -= lr m / (sqrt(v) + eps)
    yogi     m = b1 m + (1-b1) g;  v = v - (1-b2) g^2 sign(v - g^2);  x -= lr m / (sqrt(v) + eps)

v starts at eps^2 (the paper's v_{-1} >= tau^2), m at 0; no bias correction (as in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedbench.config import GroupConfig, spec
from fedbench.engine.functional import plain_eager

Tensors = dict[str, torch.Tensor]
KINDS = ("sgd", "momentum", "adagrad", "adam", "yogi")
SCHEDULES = ("constant", "step", "exponential", "cosine")


@dataclass(frozen=True)
class Optimizer:
    kind: str = "sgd"  # sgd | momentum (sgd with momentum > 0) | adagrad | adam | yogi
    lr: float = 1.0
    momentum: float = 0.0  # sgd's heavy-ball momentum
    beta1: float = 0.9  # adaptive rules' first moment
    beta2: float = 0.99  # adam / yogi second moment
    eps: float = 1e-3  # tau: adaptivity floor of the adaptive rules
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"optimizer kind {self.kind!r}; allowed: {', '.join(KINDS)}")

    @property
    def adaptive(self) -> bool:
        return self.kind in ("adagrad", "adam", "yogi")

    def init(self, params: Tensors) -> dict[str, Tensors]:
        """The optimizer's state for `params` (empty for plain SGD)."""
        if self.adaptive:
            return {
                "m": {k: torch.zeros_like(v) for k, v in params.items()},
                "v": {k: torch.full_like(v, self.eps**2) for k, v in params.items()},
            }
        if self.momentum > 0:
            return {"m": {k: torch.zeros_like(v) for k, v in params.items()}}
        return {}

    def apply(
        self,
        grads: Tensors,
        state: dict[str, Tensors],
        params: Tensors,
        lr: float | torch.Tensor | None = None,
        mask: dict[str, Any] | None = None,
        inplace: bool = False,
    ) -> tuple[dict[str, Tensors], Tensors]:
        """(new state, new params) after one step on `grads` (its keys only; others are kept).
        `mask`: entries with mask 0 keep their value. `lr` overrides the optimizer's (a round's
        scheduled rate; a tensor: a per-client rate under vmap); `inplace` updates
        `params` itself in plain eager code."""
        lr = self.lr if lr is None else lr
        mask = mask or {}
        g = (
            {k: grads[k] + self.weight_decay * params[k] for k in grads}
            if self.weight_decay > 0
            else grads
        )
        g = {k: g[k] * mask[k] if k in mask else g[k] for k in g}
        new_state: dict[str, Tensors] = {}
        if self.adaptive:
            step, new_state = self._adaptive(g, state)
            step = {k: step[k] * mask[k] if k in mask else step[k] for k in step}
        elif self.momentum > 0:
            m = {k: self.momentum * state["m"][k] + g[k] for k in g}
            new_state = {"m": m}
            step = {k: m[k] * mask[k] if k in mask else m[k] for k in m}
        else:
            step = g
        if isinstance(lr, torch.Tensor):
            return new_state, {**params, **{k: params[k] - lr * step[k] for k in step}}
        if inplace and plain_eager():
            for k in step:
                params[k].add_(step[k], alpha=-lr)
            return new_state, params
        # one fused pass per tensor (a - lr*b would allocate twice)
        return new_state, {**params, **{k: torch.add(params[k], step[k], alpha=-lr) for k in step}}

    def _adaptive(
        self, g: Tensors, state: dict[str, Tensors]
    ) -> tuple[Tensors, dict[str, Tensors]]:
        b1, b2 = self.beta1, self.beta2
        m = {k: b1 * state["m"][k] + (1 - b1) * g[k] for k in g}
        if self.kind == "adagrad":
            v = {k: state["v"][k] + g[k] * g[k] for k in g}
        elif self.kind == "adam":
            v = {k: b2 * state["v"][k] + (1 - b2) * g[k] * g[k] for k in g}
        else:  # yogi
            v = {
                k: state["v"][k] - (1 - b2) * g[k] * g[k] * torch.sign(state["v"][k] - g[k] * g[k])
                for k in g
            }
        return {k: m[k] / (v[k].sqrt() + self.eps) for k in g}, {"m": m, "v": v}


def sgd_step(params: Tensors, grads: Tensors, lr: float | torch.Tensor) -> Tensors:
    """One plain gradient step on the keys of `grads` (functional): params - lr * grads."""
    return PLAIN_SGD.apply(grads, {}, params, lr=lr)[1]


PLAIN_SGD = Optimizer("sgd")


@dataclass(frozen=True)
class LrSchedule(GroupConfig):
    """The client learning rate of round r (1..R) from the run's `lr` (config: `lr_schedule.*`):

    constant     lr
    step         lr * gamma ** floor((r - 1) / step_rounds)
    exponential  lr * gamma ** (r - 1)
    cosine       min_lr + (lr - min_lr) * (1 + cos(pi * (r - 1) / R)) / 2
    """

    name: str = spec("constant", choices=SCHEDULES)
    gamma: float = spec(0.1, gt=0, le=1)  # step / exponential: the decay factor
    step_rounds: int = spec(10, ge=1)  # step: rounds between decays
    min_lr: float = spec(0.0, ge=0)  # cosine: the rate it ends at

    def __call__(self, lr: float, round_: int, total_rounds: int) -> float:
        t = round_ - 1
        if self.name == "step":
            return lr * self.gamma ** (t // self.step_rounds)
        if self.name == "exponential":
            return lr * self.gamma**t
        if self.name == "cosine":
            return self.min_lr + (lr - self.min_lr) * (1 + math.cos(math.pi * t / total_rounds)) / 2
        return lr
