"""Shared machinery of the personalized methods: a model split into a feature extractor (`body.*`) and a
classifier (`head.*`), some parameters shared (sent both ways and averaged), the rest private to each
client and kept across rounds as stacked tensors `[N, ...]` in the client state (never objects, never a
model copy per client): `{"private": {name: [N, ...]}, "private_buffers": {name: [N, ...]}}`.

Subclasses pick `shared` ("all" | "body" | "head" | "none"), a per-parameter gradient mask for
multi-phase local training (`grad_mask`), and optionally their own local loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.func import functional_call

from fedbench.config import spec
from fedbench.engine.functional import grad, per_sample_loss, weighted_mean
from fedbench.engine.optim import sgd_step
from fedbench.engine.protocol import ClientFns, RoundContext, RunContext
from fedbench.errors import ConfigError
from fedbench.methods.base import Tensors
from fedbench.methods.local_sgd import LocalSGDConfig, LocalSGDMethod
from fedbench.metrics.comm import Payload


def per_client(v: torch.Tensor, n_clients: int) -> torch.Tensor:
    """The same starting value for every client, stacked `[N, ...]` (client state, never objects)."""
    return v.detach().unsqueeze(0).repeat(n_clients, *[1] * v.dim())


def sub(tree: Tensors, prefix: str) -> Tensors:
    """{'body.0.weight': t} -> {'0.weight': t} for prefix 'body.'."""
    return {k[len(prefix):]: v for k, v in tree.items() if k.startswith(prefix)}


@dataclasses.dataclass(frozen=True)
class PersonalConfig(LocalSGDConfig):
    # a client that never trained (partition.holdout_clients) fits its personal part this many
    # full-batch gradient steps on its own training samples before it predicts (unseen/personal_acc)
    personal_steps: int = spec(20, ge=0)
    personal_lr: float | None = spec(None, gt=0)   # null: the run's lr


class PersonalizedMethod(LocalSGDMethod):
    averages_models = False  # shared parts are averaged by `average` (FedNova's rule does not apply)
    Config = PersonalConfig
    shared = "all"
    has_global_model = False  # False: accuracy is only meaningful per client (personal/*)
    has_personal_models = True
    needs_progress = False    # True: batches carry `progress` (step / the client's steps) for phases
    # True: the client trains the shared extractor and predicts with a personal head, so its model can
    # be scored with the global extractor or with its own (the one it left its last round with)
    two_extractors = False

    # ---- set-up ----------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        params = ctx.params
        if not any(k.startswith("body.") for k in params) or not any(k.startswith("head.") for k in params):
            raise ConfigError(f"method={self.name} needs a backbone split into body and head (a feature "
                              f"extractor and a classifier: mlp, cnn, lenet5, resnet18, ...; logreg is a "
                              f"classifier only); got parameters {sorted(params)[:3]}")
        self.shared_keys = [k for k in params if self.is_shared(k)]
        self.private_keys = [k for k in params if not self.is_shared(k)]
        self.init_buffers = {k: v.detach().clone() for k, v in ctx.buffers.items()}
        # each client's own extractor is kept ([N, ...] client state) only where something scores it
        self.keeps_extractor = self.two_extractors and (ctx.extractors == "both" or self.default_extractor == "own")

    @property
    def default_extractor(self) -> str:
        """The extractor personal/* uses: the global one (the papers' convention), unless a method says."""
        return "global"
    def is_shared(self, name: str) -> bool:
        return self.shared == "all" or (self.shared != "none" and name.startswith(self.shared + "."))

    @property
    def private_buffers(self) -> bool:
        """Buffers (BatchNorm statistics, in the body) stay with the client when the body is not shared."""
        return self.shared in ("none", "head")

    def init_client_states(self, gstate: dict[str, Any], n_clients: int) -> dict[str, Any]:
        # every client's private part starts from the same initial (or warm-start) values
        state: dict[str, Any] = {"private": {k: per_client(gstate["params"][k], n_clients)
                                             for k in self.private_keys}}
        if self.private_buffers:
            state["private_buffers"] = {k: per_client(v, n_clients) for k, v in gstate["buffers"].items()}
        return {**state, **self.init_extractor_state(gstate, n_clients)}

    # ---- each client's own extractor (metrics.extractors=both, FedeCouple's local evaluation) -----
    def init_extractor_state(self, gstate: dict[str, Any], n_clients: int) -> dict[str, Any]:
        """{extractor: body params and buffers [N, ...], x_trained: [N]} where kept, else {}."""
        if not self.keeps_extractor:
            return {}
        body = {**{k: v for k, v in gstate["params"].items() if not k.startswith("head.")}, **gstate["buffers"]}
        ref = next(iter(gstate["params"].values()))
        return {"extractor": {k: per_client(v, n_clients) for k, v in body.items()},
                "x_trained": ref.new_zeros(n_clients)}  # 0 until the client's first round

    def extractor_state(self, local: dict[str, Any]) -> dict[str, Any]:
        """The extractor the client leaves this round with (its part of the next client state)."""
        if not self.keeps_extractor:
            return {}
        body = {k: v for k, v in local["params"].items() if not k.startswith("head.")}
        return {"extractor": {**body, **local["buffers"]}, "x_trained": torch.ones_like(local["steps"])}

    def with_extractor(self, gstate: dict[str, Any], cstate: Any, extractor: str) -> dict[str, Any]:
        """`gstate` whose extractor (body and buffers) is the client's own where `extractor` is "own"
        and the client has trained (a client never sampled has only the global one)."""
        if extractor == "global" or not bool(cstate["x_trained"] > 0):
            return gstate
        own = cstate["extractor"]
        return {**gstate, "params": {k: own.get(k, v) for k, v in gstate["params"].items()},
                "buffers": {k: own[k] for k in gstate["buffers"]}}

    def extractor_conventions(self) -> tuple[str, ...]:
        return ("global", "own") if self.keeps_extractor and self.ctx.extractors == "both" else ()

    def personal_params_with(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                             y_train: torch.Tensor, extractor: str) -> tuple[Tensors, Tensors]:
        return self.personal_params(self.with_extractor(gstate, cstate, extractor), cstate, x_train, y_train)

    def client_fns(self, ctx: RoundContext) -> ClientFns:
        return ClientFns(self.client_init, self.client_step, self.client_final, self.needs_progress)

    # ---- model pieces ----------------------------------------------------------------------
    def features(self, params: Tensors, buffers: Tensors, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_buffers(params, buffers, x)[0]

    def features_and_buffers(self, params: Tensors, buffers: Tensors, x: torch.Tensor) -> tuple[torch.Tensor, Tensors]:
        """(features, buffers after the call). Buffers are cloned first: train-mode BatchNorm updates its
        running statistics in place, which a grad transform forbids on captured tensors and which must not
        touch the caller's (e.g. the server's) buffers."""
        body = {k: v.clone() for k, v in sub(buffers, "body.").items()}
        h = functional_call(self.model.body, (sub(params, "body."), body), (x,))
        return h, {**buffers, **{"body." + k: v for k, v in body.items()}}

    def classify(self, params: Tensors, h: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model.head, sub(params, "head."), (h,))

    def weighted_ce(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        w = batch["w"]
        return (per_sample_loss(logits, batch["y"], self.task).to(w.dtype) * w).sum() / w.sum().clamp_min(1.0)

    # ---- server ----------------------------------------------------------------------------
    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        if self.shared == "none":
            return Payload({})
        return Payload({"params": {k: gstate["params"][k] for k in self.shared_keys},
                        "buffers": gstate["buffers"] if self.shared in ("all", "body") else {}})

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.average(gstate, up, ctx.sizes), {}

    def average(self, gstate: dict[str, Any], up: dict[str, Any], weights: torch.Tensor) -> dict[str, Any]:
        """The shared parameters (and buffers, when the body is shared) averaged with `weights`."""
        if self.shared == "none":
            return gstate
        mean = weighted_mean(up["params"], weights)
        new = self.server_apply(gstate, {k: mean[k] - gstate["params"][k] for k in mean})
        new["params"] = {**gstate["params"], **new["params"]}
        if up.get("buffers"):
            new["buffers"] = weighted_mean(up["buffers"], weights)
        return new

    # ---- client ----------------------------------------------------------------------------
    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        ref = next(iter(down["params"].values())) if down.get("params") else next(iter(cstate["private"].values()))
        params = {k: v.clone() for k, v in down.get("params", {}).items()}
        params.update({k: cstate["private"][k].clone() for k in self.private_keys})
        if self.private_buffers:
            buffers = cstate["private_buffers"]
        else:
            buffers = down.get("buffers") or self.init_buffers
        local: dict[str, Any] = {"params": params, "buffers": {k: v.clone() for k, v in buffers.items()},
                                 "steps": torch.zeros((), dtype=ref.dtype, device=ref.device)}
        if self.cfg.momentum > 0:
            local["mom"] = {k: torch.zeros_like(v) for k, v in params.items()}
        return local

    def local_loss(self, params: Tensors, local: dict[str, Any], down: dict[str, Any],
                   batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, Tensors]]:
        """(loss to differentiate, (loss to report, new buffers)). Default: the run's task loss."""
        loss, (reported, buffers) = self.loss_fn(params, local["buffers"], batch["x"], batch["y"], batch["w"])
        return loss, (reported, buffers)

    def grad_mask(self, local: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Per-parameter multiplier of the gradient (0: frozen in this phase). Default: all trained."""
        return {}

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        g, (loss, buffers) = grad(self.local_loss, has_aux=True)(local["params"], local, down, batch)
        new = dict(local, buffers=buffers, steps=local["steps"] + 1)
        new["params"] = self.sgd(local["params"], g, local, new, self.grad_mask(local, batch))
        return new, loss

    def private_state(self, local: dict[str, Any]) -> dict[str, Any]:
        keep: dict[str, Any] = {"private": {k: local["params"][k] for k in self.private_keys}}
        if self.private_buffers:
            keep["private_buffers"] = dict(local["buffers"])
        return {**keep, **self.extractor_state(local)}

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        up = {} if self.shared == "none" else {
            "params": {k: local["params"][k] for k in self.shared_keys},
            "buffers": local["buffers"] if self.shared in ("all", "body") else {}}
        return up, self.private_state(local)

    # ---- evaluation ------------------------------------------------------------------------
    def personal_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                        y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        """The model client `cstate` predicts with: shared part from the server, private part its own."""
        params = dict(gstate["params"])
        params.update({k: cstate["private"][k] for k in self.private_keys})
        if self.private_buffers:
            return params, dict(cstate["private_buffers"])
        return params, gstate["buffers"]

    def new_client_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                          y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        """A new client: the server's shared part, its private part where every client starts, then
        `personal_steps` full-batch steps on its own samples on the personal part (the private keys;
        the head where everything is shared), the rest frozen."""
        params, buffers = self.personal_params(gstate, cstate, x_train, y_train)
        return self.fit_personal(params, buffers, self.new_client_keys(), x_train, y_train), buffers

    def new_client_keys(self) -> list[str]:
        return list(self.private_keys) or [k for k in self.shared_keys if k.startswith("head.")]

    def fit_personal(self, params: Tensors, buffers: Tensors, keys: list[str], x: torch.Tensor,
                     y: torch.Tensor) -> Tensors:
        """`personal_steps` full-batch gradient steps on `keys` of `params` (the others frozen)."""
        lr = self.cfg.personal_lr if self.cfg.personal_lr is not None else self.lr
        w = torch.ones(len(y), dtype=next(iter(params.values())).dtype, device=y.device)
        fitted = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in fitted}

        def loss(p: Tensors) -> torch.Tensor:
            return self.loss_fn({**frozen, **p}, buffers, x, y, w)[0]

        with torch.enable_grad():
            for _ in range(self.cfg.personal_steps):
                fitted = sgd_step(fitted, grad(loss)(fitted), lr)
        return {**frozen, **fitted}
