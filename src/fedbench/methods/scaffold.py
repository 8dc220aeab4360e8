"""SCAFFOLD (Karimireddy et al. 2020) with the option-II control-variate update.

Downlink: model + server control variate c. Uplink: model delta + control-variate delta.
Per-client control variates c_i are one stacked tensor per parameter, client state {"c": {name: [N, ...]}}.
"""

from __future__ import annotations

from typing import Any

import torch

from fedbench.engine.functional import weighted_mean
from fedbench.engine.protocol import RoundContext
from fedbench.methods.base import LocalSGDMethod, Tensors
from fedbench.metrics.comm import Payload
from fedbench.registry import register


@register("method", "scaffold")
class Scaffold(LocalSGDMethod):
    name = "scaffold"

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

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        delta_y = weighted_mean(up["delta_y"], ctx.sizes)
        new = self.server_apply(gstate, delta_y)
        # c = mean over ALL clients of c_i, kept incrementally: c += (|S|/N) * mean_S(delta c_i)
        frac = len(ctx.cohort) / ctx.n_clients
        mean_dc = {k: v.mean(0) for k, v in up["delta_c"].items()}
        new["c"] = {k: gstate["c"][k] + frac * mean_dc[k] for k in gstate["c"]}
        new["buffers"] = weighted_mean(up["buffers"], ctx.sizes)
        return new, {}
