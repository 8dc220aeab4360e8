"""FedProx (Li et al. 2020): FedAvg with (mu/2)||w - w_global||^2 in every local step.
Sends exactly what FedAvg sends."""

from typing import Any

from fedbench.methods.base import LocalSGDMethod, Tensors
from fedbench.registry import register


@register("method", "fedprox")
class FedProx(LocalSGDMethod):
    name = "fedprox"

    def correct_grad(self, g: Tensors, local: dict[str, Any], down: dict[str, Any]) -> Tensors:
        mu = float(self.hp.get("mu", 0.01))
        return {k: g[k] + mu * (local["params"][k] - down["params"][k]) for k in g}
