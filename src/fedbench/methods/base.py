"""The method API. Client code is written for ONE client as pure tensor functions; the executor adds
the client dimension (a loop, or torch.func.vmap). See specs/architecture.md.

    init_global(params, buffers)                 -> global state (dict of tensors)
    init_client_states(global_state, n_clients)  -> persistent per-client state, stacked [N, ...]
    broadcast(global_state, round)               -> downlink Payload
    client_init(down, client_state, client_id)   -> local state
    client_step(local, down, batch)              -> (local state, loss)     # one minibatch:
                                                   batch = {x, y, w (sample weights, 0 = padding), noise?}
    client_final(local, down, client_state)      -> (uplink tensors, new client state)
    uplink(stacked_up)                           -> uplink Payload (for byte counting)
    aggregate(global_state, stacked_up, weights, round, cohort, n_clients) -> global state
    eval_state(global_state)                     -> (params, buffers) of the global model

A method that needs randomness inside a step sets `noise_dim` (> 0): every step then gets
batch["noise"], uniform(0, 1) numbers of that size drawn from the client's seeded generator for the
round, so the sequential and batched executors see the same numbers and a resumed run redraws them.

Client functions must stay batchable: no Python branches on tensor values, no .item(), no
torch.optim objects (optimizer state lives in the local state).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import grad
from torch.utils._pytree import tree_map

from fedbench.engine.functional import LossFn, weighted_mean
from fedbench.metrics.comm import Payload

Tensors = dict[str, torch.Tensor]


class Method:
    name = "base"
    batchable = True
    reports_train_loss = True
    uses_backbone = True  # False: the method has its own model (predict) and no backbone is built
    noise_dim = 0         # > 0: uniform noise of this size per local step in batch["noise"]
    # optional hooks the runner uses when a method defines them:
    #   predict(global_state, x) -> outputs        a model that is not the backbone module
    #   should_evaluate(round) -> bool             evaluate on these rounds only
    #   round_metrics(global_state, round) -> dict extra per-round metrics
    #   check_run(rounds, participation, local_epochs, local_steps)   run-level requirements
    #   gated_final(global_state) -> {name: tensor}  the sparsified parameters (density, TDR)
    #   expected_density(global_state) -> float

    def __init__(self, hp: dict[str, Any], loss_fn: LossFn, lr: float, num_classes: int = 0,
                 in_features: int = 0):
        self.hp = hp
        self.loss_fn = loss_fn
        self.lr = float(lr)
        self.num_classes = num_classes
        self.in_features = in_features
        self.device = torch.device("cpu")  # the run's device; set by the runner

    def setup(self, params: Tensors, buffers: Tensors, total_rounds: int) -> None:
        """Called once per run (fresh or resumed) before anything else; may set noise_dim."""
        self.total_rounds = total_rounds

    # ---- server side -------------------------------------------------------------------
    def init_global(self, params: Tensors, buffers: Tensors) -> dict[str, Any]:
        return {"params": params, "buffers": buffers}

    def init_client_states(self, gstate: dict[str, Any], n_clients: int) -> dict[str, torch.Tensor]:
        return {}

    def broadcast(self, gstate: dict[str, Any], round_: int) -> Payload:
        raise NotImplementedError

    def uplink(self, stacked_up: dict[str, Any]) -> Payload:
        return Payload(stacked_up, stacked=True)

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any], weights: torch.Tensor, round_: int,
                  cohort: torch.Tensor, n_clients: int) -> dict[str, Any]:
        raise NotImplementedError

    def eval_state(self, gstate: dict[str, Any]) -> tuple[Tensors, Tensors]:
        return gstate["params"], gstate["buffers"]

    # ---- client side (one client; batchable) ---------------------------------------------
    def client_init(self, down: dict[str, Any], cstate: Tensors, client_id: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        raise NotImplementedError

    def client_final(self, local: dict[str, Any], down: dict[str, Any],
                     cstate: Tensors) -> tuple[dict[str, Any], Tensors]:
        raise NotImplementedError


class LocalSGDMethod(Method):
    """FedAvg-style skeleton: local SGD from the broadcast model, then a server update.

    Subclasses change `correct_grad` (FedProx's proximal term, SCAFFOLD's control variates),
    what is broadcast, and what is uploaded.
    """

    # ---- server --------------------------------------------------------------------------
    def init_global(self, params: Tensors, buffers: Tensors) -> dict[str, Any]:
        state: dict[str, Any] = {"params": params, "buffers": buffers}
        if float(self.hp.get("server_momentum", 0.0)) > 0:
            state["server_mom"] = tree_map(torch.zeros_like, params)
        return state

    def broadcast(self, gstate: dict[str, Any], round_: int) -> Payload:
        return Payload({"params": gstate["params"], "buffers": gstate["buffers"]})

    def server_apply(self, gstate: dict[str, Any], delta: Tensors) -> dict[str, Any]:
        """params += server_lr * (momentum-filtered) mean client delta (FedAvgM when momentum > 0)."""
        slr = float(self.hp.get("server_lr", 1.0))
        beta = float(self.hp.get("server_momentum", 0.0))
        new = dict(gstate)
        if beta > 0:
            mom = {k: beta * gstate["server_mom"][k] + delta[k] for k in delta}
            new["server_mom"] = mom
            delta = mom
        new["params"] = {k: gstate["params"][k] + slr * delta[k] for k in delta}
        return new

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any], weights: torch.Tensor, round_: int,
                  cohort: torch.Tensor, n_clients: int) -> dict[str, Any]:
        mean_params = weighted_mean(up["params"], weights)
        delta = {k: mean_params[k] - gstate["params"][k] for k in mean_params}
        new = self.server_apply(gstate, delta)
        new["buffers"] = weighted_mean(up["buffers"], weights)
        return new

    # ---- client --------------------------------------------------------------------------
    def client_init(self, down: dict[str, Any], cstate: Tensors, client_id: torch.Tensor) -> dict[str, Any]:
        params = down["params"]
        local: dict[str, Any] = {
            "params": {k: v.clone() for k, v in params.items()},
            "buffers": {k: v.clone() for k, v in down["buffers"].items()},
            "steps": torch.zeros((), dtype=next(iter(params.values())).dtype, device=client_id.device),
        }
        if float(self.hp.get("momentum", 0.0)) > 0:
            local["mom"] = {k: torch.zeros_like(v) for k, v in params.items()}
        return local

    def correct_grad(self, g: Tensors, local: dict[str, Any], down: dict[str, Any]) -> Tensors:
        return g

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        params = local["params"]
        g, (loss, buffers) = grad(self.loss_fn, has_aux=True)(params, local["buffers"], batch["x"], batch["y"],
                                                               batch["w"])
        wd = float(self.hp.get("weight_decay", 0.0))
        if wd > 0:
            g = {k: g[k] + wd * params[k] for k in g}
        g = self.correct_grad(g, local, down)
        new = dict(local, buffers=buffers, steps=local["steps"] + 1)
        mu = float(self.hp.get("momentum", 0.0))
        if mu > 0:
            mom = {k: mu * local["mom"][k] + g[k] for k in g}
            new["mom"] = mom
            g = mom
        # one fused pass per tensor (a - lr*b would allocate twice)
        new["params"] = {k: torch.add(params[k], g[k], alpha=-self.lr) for k in params}
        return new, loss

    def client_final(self, local: dict[str, Any], down: dict[str, Any],
                     cstate: Tensors) -> tuple[dict[str, Any], Tensors]:
        return {"params": local["params"], "buffers": local["buffers"]}, {}
