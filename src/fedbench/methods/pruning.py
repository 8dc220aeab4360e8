"""Magnitude-pruning baselines for FLoPS, all with a GLOBAL top-m (m = floor(rho * D) over every gated
parameter) so that densities are comparable:

- `fedht` (Fed-HT): FedAvg, then keep the top-m gated entries of the global model after each aggregation.
- `fediterht` (FedIter-HT): also hard-threshold each client model before upload (sparse uplink).
- `fedavg_prune`: FedAvg, then one-shot magnitude pruning of the final model (the last round's).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from fedbench.engine.protocol import RoundContext, RunContext
from fedbench.methods.base import Tensors
from fedbench.methods.flops import SparsityConfig, check_prune_start, select_gated
from fedbench.methods.local_sgd import LocalSGDConfig, LocalSGDMethod
from fedbench.metrics.comm import SPARSE, Payload
from fedbench.metrics.sparsity import top_m_mask
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class TopMConfig(LocalSGDConfig, SparsityConfig):
    def __post_init__(self) -> None:
        LocalSGDConfig.__post_init__(self)
        SparsityConfig.__post_init__(self)


class TopMMethod(LocalSGDMethod):
    Config = TopMConfig
    fusable = True
    run_keys = ("server_lr", "target_density", "prune_start")

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        check_prune_start(self.cfg.prune_start, ctx.total_rounds)
        self.rho = self.cfg.target_density
        self.gated = select_gated(ctx.params, self.cfg.gated)
        self.m = max(1, math.floor(self.rho * sum(ctx.params[n].numel() for n in self.gated)))

    def threshold(self, params: Tensors) -> Tensors:
        gated = {n: params[n] for n in self.gated}
        keep = top_m_mask(gated, self.m)
        return {k: torch.where(keep[k], v, 0.0) if k in keep else v for k, v in params.items()}

    def gated_final(self, gstate: dict[str, Any]) -> Tensors:
        params, _ = self.eval_state(gstate)
        return {n: params[n] for n in self.gated}


@register("method", "fedht")
class FedHT(TopMMethod):
    name = "fedht"

    def post_aggregate(self, gstate: dict[str, Any], new: dict[str, Any], reduced: dict[str, Any],
                       ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        new["params"] = self.threshold(new["params"])
        return new, {}

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        # after round 1 the global model is m-sparse: its gated tensors travel as sparse payloads
        gated = {n: gstate["params"][n] for n in self.gated}
        dense = {k: v for k, v in gstate["params"].items() if k not in gated}
        return Payload({"params": dense, "gated": gated, "buffers": gstate["buffers"]}, encodings={"gated": SPARSE})

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        return super().client_init({"params": {**down["params"], **down["gated"]}, "buffers": down["buffers"]},
                                   cstate, client_id)



@register("method", "fediterht")
class FedIterHT(FedHT):
    name = "fediterht"
    run_keys = ("server_lr", "prune_start")  # clients threshold to the run's m: not per run

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        params = self.threshold(local["params"])
        gated = {n: params[n] for n in self.gated}
        return {"params": {k: v for k, v in params.items() if k not in gated}, "gated": gated,
                "buffers": local["buffers"]}, {}

    def uplink(self, stacked_up: dict[str, Any]) -> Payload:
        return Payload(stacked_up, encodings={"gated": SPARSE}, stacked=True)

    def uplink_share(self, up: dict[str, Any], ctx: RoundContext, rows: slice) -> dict[str, Any]:
        merged = {"params": {**up["params"], **up["gated"]}, "buffers": up["buffers"]}
        return super().uplink_share(merged, ctx, rows)


@register("method", "fedavg_prune")
class FedAvgPrune(TopMMethod):
    """Dense FedAvg training; the model is pruned once, after the last round."""

    name = "fedavg_prune"

    def post_aggregate(self, gstate: dict[str, Any], new: dict[str, Any], reduced: dict[str, Any],
                       ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        if ctx.round == self.total_rounds:
            new["params"] = self.threshold(new["params"])
        return new, {}
