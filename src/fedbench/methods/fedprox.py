"""FedProx (Li et al. 2020): FedAvg with (mu/2)||w - w_global||^2 in every local step.
Sends exactly what FedAvg sends."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedbench.config import spec
from fedbench.methods.base import Tensors
from fedbench.methods.local_sgd import LocalSGDConfig, LocalSGDMethod
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class FedProxConfig(LocalSGDConfig):
    mu: float = spec(0.01, ge=0)  # weight of the proximal term


@register("method", "fedprox")
class FedProx(LocalSGDMethod):
    name = "fedprox"
    Config = FedProxConfig
    fusable = True
    run_keys = ("server_lr", "mu")
    client_run_keys = ("mu",)

    def correct_grad(self, g: Tensors, local: dict[str, Any], down: dict[str, Any]) -> Tensors:
        mu = self.cfg.mu
        return {k: g[k] + mu * (local["params"][k] - down["params"][k]) for k in g}
