"""FedProto (Tan et al. 2022): no model parameters are exchanged, only class prototypes (mean
feature per class). Each client trains its own model with cross-entropy plus
`lam * mean_j (f(x)_j - P_y,j)^2` (MSE) toward the global prototype of the sample's class; the server
averages the clients' prototypes weighted by their class counts. Sends C x d prototypes and C counts
each way."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fedbench.config import spec
from fedbench.engine.functional import grad
from fedbench.engine.protocol import RoundContext, RunContext
from fedbench.errors import ConfigError
from fedbench.methods.base import Tensors
from fedbench.methods.personal import PersonalConfig, PersonalizedMethod
from fedbench.metrics.comm import Payload
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class FedProtoConfig(PersonalConfig):
    lam: float = spec(1.0, ge=0)  # weight of the prototype pull


@register("method", "fedproto")
class FedProto(PersonalizedMethod):
    name = "fedproto"
    Config = FedProtoConfig
    shared = "none"

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        if "head.weight" not in ctx.params:
            raise ConfigError("method=fedproto needs a linear classifier head (head.weight)")
        self.feature_dim = int(ctx.params["head.weight"].shape[1])

    def init_global(self, params: Tensors, buffers: Tensors) -> dict[str, Any]:
        ref = params["head.weight"]
        return {"params": params, "buffers": buffers,
                "protos": ref.new_zeros(self.num_classes, self.feature_dim),
                "counts": ref.new_zeros(self.num_classes)}

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        return Payload({"protos": gstate["protos"], "counts": gstate["counts"]})

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        local = super().client_init(down, cstate, client_id)
        local["psum"] = torch.zeros_like(down["protos"])
        local["pcnt"] = torch.zeros_like(down["counts"])
        return local

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        w = batch["w"]

        def loss_fn(params: Tensors):
            h, buffers = self.features_and_buffers(params, local["buffers"], batch["x"])
            ce = self.weighted_ce(self.classify(params, h), batch)
            target = down["protos"][batch["y"]]
            known = (down["counts"][batch["y"]] > 0).to(h.dtype) * w
            # mean squared error per feature dimension, as in the FedProto paper's MSE regulariser
            pull = (((h - target) ** 2).mean(-1) * known).sum() / w.sum().clamp_min(1.0)
            return ce + self.cfg.lam * pull, (ce.detach(), h.detach(), buffers)

        g, (ce, h, buffers) = grad(loss_fn, has_aux=True)(local["params"])
        new = dict(local, buffers=buffers, steps=local["steps"] + 1)
        new["params"] = self.sgd(local["params"], g, local, new, {})
        onehot = F.one_hot(batch["y"], self.num_classes).to(h.dtype) * w.unsqueeze(-1)
        new["psum"] = local["psum"] + onehot.T @ h
        new["pcnt"] = local["pcnt"] + onehot.sum(0)
        return new, ce

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        protos = local["psum"] / local["pcnt"].clamp_min(1.0).unsqueeze(-1)
        return {"protos": protos, "counts": local["pcnt"]}, self.private_state(local)

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        counts = up["counts"].sum(0)  # [C]
        protos = (up["protos"] * up["counts"].unsqueeze(-1)).sum(0) / counts.clamp_min(1.0).unsqueeze(-1)
        seen = counts > 0  # a class nobody in this cohort holds keeps its previous prototype
        return dict(gstate, protos=torch.where(seen.unsqueeze(-1), protos, gstate["protos"]),
                    counts=torch.where(seen, counts, gstate["counts"])), {}
