"""Ditto (Li et al. 2021): a global model trained exactly as FedAvg, plus a personal model per client
trained on the same batches with a proximal pull `lambda/2 ||v - w_global||^2` toward the broadcast
global model. Sends what FedAvg sends; the personal models (all parameters, client state
{"personal": {name: [N, ...]}}) never leave."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedbench.config import spec
from fedbench.engine.functional import grad
from fedbench.methods.base import Tensors
from fedbench.methods.personal import PersonalConfig, PersonalizedMethod, per_client
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class DittoConfig(PersonalConfig):
    lam: float = spec(0.1, ge=0)  # pull of the personal model toward the global one


@register("method", "ditto")
class Ditto(PersonalizedMethod):
    name = "ditto"
    Config = DittoConfig
    shared = "all"
    has_global_model = True

    def init_client_states(self, gstate: dict[str, Any], n_clients: int) -> dict[str, Any]:
        return {"personal": {k: per_client(v, n_clients) for k, v in gstate["params"].items()}}

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        local = super().client_init(down, {}, client_id)
        local["v"] = {k: v.clone() for k, v in cstate["personal"].items()}
        return local

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        new, loss = super().client_step(local, down, batch)  # the global model's FedAvg step
        g_v, _ = grad(self.loss_fn, has_aux=True)(local["v"], local["buffers"], batch["x"], batch["y"], batch["w"])
        g_v = {k: g_v[k] + self.cfg.lam * (local["v"][k] - down["params"][k]) for k in g_v}
        new["v"] = self.sgd(local["v"], g_v, local, new, {}, mom_key="mom_v")
        return new, loss

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        up, _ = super().client_final(local, down, cstate)
        return up, {"personal": dict(local["v"])}

    def personal_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                        y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        return dict(cstate["personal"]), gstate["buffers"]

    def new_client_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                          y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        """A new client's personal model starts from the global one (where its pull points) and takes
        `personal_steps` full-batch steps on its own samples."""
        params = dict(gstate["params"])
        return self.fit_personal(params, gstate["buffers"], list(params), x_train, y_train), gstate["buffers"]
