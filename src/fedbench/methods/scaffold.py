"""SCAFFOLD (Karimireddy et al. 2020) with the option-II control-variate update.

Downlink: model + server control variate c. Uplink: model delta + control-variate delta.
Per-client control variates c_i are one stacked tensor per parameter, client state {"c": {name: [N, ...]}}.

Server step as Algorithm 1: x += lr_g * mean_S(delta y_i), c += (|S|/N) * mean_S(delta c_i), both plain
means (`weighting: uniform`, the default); `weighting: samples` weights the model deltas (and BatchNorm
buffers) by the clients' training-set sizes, as FedAvg does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedbench.config import spec
from fedbench.engine.functional import mean_share
from fedbench.engine.protocol import RoundContext
from fedbench.methods.base import Tensors
from fedbench.methods.local_sgd import LocalSGDConfig, LocalSGDMethod
from fedbench.metrics.comm import Payload
from fedbench.registry import register

WEIGHTINGS = ("uniform", "samples")


@dataclasses.dataclass(frozen=True)
class ScaffoldConfig(LocalSGDConfig):
    # uniform: Algorithm 1's plain mean of model deltas; samples: weighted by n_k
    weighting: str = spec("uniform", choices=WEIGHTINGS)


@register("method", "scaffold")
class Scaffold(LocalSGDMethod):
    averages_models = False  # it averages model and control-variate changes its own way
    name = "scaffold"
    Config = ScaffoldConfig
    fusable = True
    run_keys = ("server_lr",)

    def init_global(self, params: Tensors, buffers: Tensors) -> dict[str, Any]:
        state = super().init_global(params, buffers)
        state["c"] = {k: torch.zeros_like(v) for k, v in params.items()}
        return state

    def init_client_states(self, gstate: dict[str, Any], n_clients: int) -> dict[str, Any]:
        return {"c": {k: v.new_zeros((n_clients, *v.shape)) for k, v in gstate["params"].items()}}

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        return Payload({"params": gstate["params"], "buffers": gstate["buffers"], "c": gstate["c"]})

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        local = super().client_init(down, cstate, client_id)
        local["c_i"] = dict(cstate["c"])
        return local

    def correct_grad(self, g: Tensors, local: dict[str, Any], down: dict[str, Any]) -> Tensors:
        return {k: g[k] - local["c_i"][k] + down["c"][k] for k in g}

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        x, y = down["params"], local["params"]
        scale = 1.0 / (local["steps"].clamp_min(1.0) * self.lr)
        c_new = {k: local["c_i"][k] - down["c"][k] + (x[k] - y[k]) * scale for k in x}
        up = {
            "delta_y": {k: y[k] - x[k] for k in x},
            "delta_c": {k: c_new[k] - local["c_i"][k] for k in x},
            "buffers": local["buffers"],
        }
        return up, {"c": c_new}

    def uplink_share(self, up: dict[str, Any], ctx: RoundContext, rows: slice) -> dict[str, Any]:
        k = len(ctx.cohort)
        ones = torch.ones(k, dtype=ctx.sizes.dtype, device=ctx.sizes.device)
        weights = ones if self.cfg.weighting == "uniform" else ctx.sizes
        w, first = weights[rows], rows.start == 0 and rows.stop > rows.start
        return {"delta_y": mean_share(up["delta_y"], w, weights.sum(), first),
                "delta_c": mean_share(up["delta_c"], ones[rows], ones.sum(), first),
                "buffers": mean_share(up["buffers"], w, weights.sum(), first)}

    def aggregate_shares(self, gstate: dict[str, Any], reduced: dict[str, Any],
                         ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        new = self.server_apply(gstate, reduced["delta_y"])
        # c = mean over ALL clients of c_i, kept incrementally: c += (|S|/N) * mean_S(delta c_i)
        frac = len(ctx.cohort) / ctx.n_clients
        new["c"] = {k: gstate["c"][k] + frac * reduced["delta_c"][k] for k in gstate["c"]}
        new["buffers"] = reduced["buffers"]
        return new, {}
