"""FedRoD (Chen & Chao, ICLR 2022): one model, two heads. The body and a GENERIC head are trained with
the balanced softmax loss (logits shifted by the log of the client's own class prior, so classes a
client lacks are not pushed down) and averaged as in FedAvg; a PERSONAL head, private to each client
and zero at the start, is trained with cross-entropy on the sum of the generic logits (detached) and its
own logits on detached features. A client predicts with generic + personal logits, which for linear
heads is one linear head with summed weights. Sends what FedAvg sends; the personal heads
(client state `personal_head`, `[N, ...]`) never leave."""

from __future__ import annotations

from typing import Any

import torch

from fedbench.engine.functional import grad
from fedbench.engine.optim import sgd_step
from fedbench.engine.protocol import RunContext
from fedbench.errors import ConfigError
from fedbench.methods.base import Tensors
from fedbench.methods.personal import PersonalizedMethod
from fedbench.registry import register


@register("method", "fedrod")
class FedRoD(PersonalizedMethod):
    name = "fedrod"
    shared = "all"
    has_global_model = True    # the generic head: balanced, evaluated as the global model
    two_extractors = True

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.head_keys = [k for k in ctx.params if k.startswith("head.")]
        if sorted(self.head_keys) != ["head.bias", "head.weight"]:
            raise ConfigError(f"method=fedrod needs a linear classifier head (head.weight, head.bias); "
                              f"got {self.head_keys}")

    def init_client_states(self, gstate: dict[str, Any], n_clients: int) -> dict[str, Any]:
        p = gstate["params"]
        counts = self.ctx.label_counts  # each client's class prior comes from its own training labels
        if counts is None or counts.shape != (n_clients, self.num_classes):
            raise ConfigError("method=fedrod needs a classification task (each client's label counts)")
        return {"personal_head": {k: p[k].new_zeros(n_clients, *p[k].shape) for k in self.head_keys},
                "label_counts": counts.to(p["head.weight"]), **self.init_extractor_state(gstate, n_clients)}

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        local = super().client_init(down, {}, client_id)
        local["phead"] = {k: v.clone() for k, v in cstate["personal_head"].items()}
        counts = cstate["label_counts"]
        # log prior; a class the client lacks gets a very negative shift instead of -inf (finite grads)
        local["log_prior"] = torch.log((counts / counts.sum().clamp_min(1.0)).clamp_min(1e-12))
        local["label_counts"] = counts
        return local

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        def loss_fn(params: Tensors, phead: Tensors):
            h, buffers = self.features_and_buffers(params, local["buffers"], batch["x"])
            generic = self.classify(params, h)
            balanced = self.weighted_ce(generic + local["log_prior"], batch)      # body + generic head
            personal = self.weighted_ce(generic.detach() + self.classify(phead, h.detach()), batch)  # P-head
            return balanced + personal, (balanced.detach(), buffers)

        (g, g_p), (loss, buffers) = grad(loss_fn, argnums=(0, 1), has_aux=True)(local["params"], local["phead"])
        new = dict(local, buffers=buffers, steps=local["steps"] + 1)
        new["params"] = self.sgd(local["params"], g, local, new, {})
        new["phead"] = sgd_step(local["phead"], g_p, self.lr)
        return new, loss

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        up, _ = super().client_final(local, down, cstate)
        return up, {"personal_head": dict(local["phead"]), "label_counts": local["label_counts"],
                    **self.extractor_state(local)}

    def personal_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                        y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        params = dict(gstate["params"])
        for k in self.head_keys:  # generic + personal logits == one linear head with summed weights
            params[k] = params[k] + cstate["personal_head"][k]
        return params, gstate["buffers"]
