"""The FedAvg family: local SGD from the broadcast model, then a server optimizer step on the
weighted mean client delta (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad: `method.server_opt`).

A method of the family changes what clients compute (`correct_grad`: FedProx's proximal term,
SCAFFOLD's control variates), what travels (`broadcast`, `uplink`, `uplink_share`) and what the
server does after the mean (`post_aggregate`: hard thresholding, metrics). It never overrides
`aggregate`, so a cohort sharded over workers always takes the all-reduce path (one model-sized
message per rank) and equals the one-process result; a subclass that does replace `aggregate` (the
personalized methods) gathers every client's uplink instead (`aggregates_by_shares` is derived,
never set by hand).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedbench.config import MethodConfig, spec
from fedbench.engine.functional import grad, mean_share
from fedbench.engine.optim import KINDS, Optimizer
from fedbench.engine.protocol import RoundContext, RunContext, Tensors
from fedbench.errors import ConfigError
from fedbench.methods.base import Method
from fedbench.metrics.comm import Payload


@dataclasses.dataclass(frozen=True)
class LocalSGDConfig(MethodConfig):
    # client SGD momentum (its state lives in the local state, reset each round)
    momentum: float = spec(0.0, ge=0, lt=1)
    weight_decay: float = spec(0.0, ge=0)
    # the server's step on the pseudo-gradient -(mean client delta): sgd (FedAvg; FedAvgM with
    # server_momentum > 0), momentum (= sgd, server_momentum required), adam, yogi, adagrad (FedOpt)
    server_opt: str = spec("sgd", choices=KINDS)
    server_lr: float = spec(1.0, gt=0)
    server_momentum: float = spec(0.0, ge=0, lt=1)  # sgd / momentum: heavy ball
    server_beta1: float = spec(0.9, ge=0, lt=1)  # adam / yogi / adagrad: first moment
    server_beta2: float = spec(0.99, ge=0, lt=1)  # adam / yogi: second moment
    server_eps: float = spec(1e-3, gt=0)  # adaptive rules: tau, the adaptivity floor
    # BatchNorm in local training: batch statistics (updated) | frozen (the
    bn: str = spec("batch", choices=("batch", "frozen"))
    # starting statistics, never updated: FedSQ's default, a control for it)
    # the server's mean of client models: none (n_k-weighted) | fednova (Wang et al. 2020: each
    # client's change divided by its local steps tau_k, the mean rescaled by sum_k p_k tau_k, so that
    # clients that ran more steps (larger data, or not stragglers) do not pull the model their way)
    normalize: str = spec("none", choices=("none", "fednova"))

    def __post_init__(self) -> None:  # subclasses call it for their cross-key checks
        if self.server_opt == "momentum" and self.server_momentum == 0:
            raise ConfigError(
                "method.server_opt=momentum needs method.server_momentum > 0 (e.g. 0.9)"
            )


class LocalSGDMethod(Method):
    """FedAvg-style skeleton: local SGD from the broadcast model, then a server optimizer step."""

    Config = LocalSGDConfig
    step_size_keys = ("server_lr",)
    aggregates_by_shares = True
    averages_models = True  # the server takes a weighted mean of client models (method.normalize applies)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a subclass that replaces `aggregate` reduces the uplink some other way: gather it
        cls.aggregates_by_shares = cls.aggregate is LocalSGDMethod.aggregate

    def __init__(self, config: MethodConfig | None = None):
        super().__init__(config)
        c = self.cfg
        self.server_opt = Optimizer(
            "sgd" if c.server_opt == "momentum" else c.server_opt,
            lr=c.server_lr,
            momentum=c.server_momentum,
            beta1=c.server_beta1,
            beta2=c.server_beta2,
            eps=c.server_eps,
        )

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.client_opt = Optimizer(
            "sgd", lr=self.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay
        )
        self.client_opt_plain = dataclasses.replace(
            self.client_opt, momentum=0.0
        )  # a state without momentum
        if self.cfg.normalize != "none" and not self.averages_models:
            raise ConfigError(f"method.normalize={self.cfg.normalize}: method={self.name} does not aggregate "
                              f"by a weighted mean of client models; leave method.normalize=none")
        if self.cfg.bn == "frozen" and self.model is not None:
            # BatchNorm normalises with, and keeps, the starting running statistics
            self.model.eval()

    # ---- server --------------------------------------------------------------------------
    def init_global(self, params: Tensors, buffers: Tensors) -> dict[str, Any]:
        state: dict[str, Any] = {"params": params, "buffers": buffers}
        opt_state = self.server_opt.init(params)
        if opt_state:
            state["server_opt"] = opt_state
        return state

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        return Payload({"params": gstate["params"], "buffers": gstate["buffers"]})

    def server_apply(self, gstate: dict[str, Any], delta: Tensors) -> dict[str, Any]:
        """The server optimizer's step on the pseudo-gradient -delta (delta: the mean client delta
        of the keys it holds; other parameters are kept)."""
        new = dict(gstate)
        opt_state, new["params"] = self.server_opt.apply(
            {k: -d for k, d in delta.items()}, gstate.get("server_opt", {}), gstate["params"]
        )
        if opt_state:
            new["server_opt"] = {
                part: {**gstate["server_opt"][part], **opt_state[part]} for part in opt_state
            }
        return new

    def aggregate(
        self, gstate: dict[str, Any], up: dict[str, Any], ctx: RoundContext
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.aggregate_shares(
            gstate, self.uplink_share(up, ctx, slice(0, len(ctx.cohort))), ctx
        )

    def uplink_share(self, up: dict[str, Any], ctx: RoundContext, rows: slice) -> dict[str, Any]:
        """Clients `rows`' share of the n_k-weighted mean model and buffers (fednova: of
        sum_k a_k w_k with a_k = tau_eff p_k / tau_k; `aggregate_shares` adds the rest)."""
        w, total, first = (
            ctx.sizes[rows],
            ctx.sizes.sum(),
            rows.start == 0 and rows.stop > rows.start,
        )
        model_w, model_total = (self.fednova_weights(ctx)[rows], 1.0) if self.cfg.normalize == "fednova" \
            else (w, total)
        return {
            "params": mean_share(up["params"], model_w, model_total, first),
            "buffers": mean_share(up["buffers"], w, total, first),
        }

    def fednova_weights(self, ctx: RoundContext) -> torch.Tensor:
        """[K] a_k = tau_eff p_k / tau_k (p_k = n_k / sum n, tau_k the local steps client k completed,
        tau_eff = sum_k p_k tau_k): sum_k a_k (w_k - w) is FedNova's normalised update."""
        p = ctx.sizes / ctx.sizes.sum()
        tau = ctx.steps.to(p.dtype).clamp_min(1.0)
        return (p * tau).sum() * p / tau

    def aggregate_shares(
        self, gstate: dict[str, Any], reduced: dict[str, Any], ctx: RoundContext
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        # the reduced model is sum_k a_k w_k: its change is that minus (sum_k a_k) w (1 for a mean)
        scale = self.fednova_weights(ctx).sum() if self.cfg.normalize == "fednova" else 1.0
        delta = {k: reduced["params"][k] - scale * gstate["params"][k] for k in reduced["params"]}
        new = self.server_apply(gstate, delta)
        new["buffers"] = reduced["buffers"]
        return self.post_aggregate(gstate, new, reduced, ctx)

    def post_aggregate(
        self,
        gstate: dict[str, Any],
        new: dict[str, Any],
        reduced: dict[str, Any],
        ctx: RoundContext,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The server's change to the new global state after the mean and the optimizer step, and
        the round's metrics (e.g. hard thresholding). `gstate` is the state before the round."""
        return new, {}

    # ---- client --------------------------------------------------------------------------
    def client_init(
        self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor
    ) -> dict[str, Any]:
        params = down["params"]
        local: dict[str, Any] = {
            "params": {k: v.clone() for k, v in params.items()},
            "buffers": {k: v.clone() for k, v in down["buffers"].items()},
            "steps": torch.zeros(
                (), dtype=next(iter(params.values())).dtype, device=client_id.device
            ),
        }
        if self.cfg.momentum > 0:
            local["mom"] = {k: torch.zeros_like(v) for k, v in params.items()}
        return local

    def correct_grad(self, g: Tensors, local: dict[str, Any], down: dict[str, Any]) -> Tensors:
        return g

    def sgd(
        self,
        params: Tensors,
        g: Tensors,
        local: dict[str, Any],
        new: dict[str, Any],
        mask: dict[str, Any] | None = None,
        mom_key: str = "mom",
    ) -> Tensors:
        """One step of the client optimizer (the method's weight decay and momentum, the round's
        lr); entries with mask 0 stay put. Writes the momentum buffer into `new` (the local state
        being built) under `mom_key`. In plain eager code (the sequential executor) `params` belong
        to the local state and are updated in place."""
        opt = self.client_opt if mom_key in local else self.client_opt_plain
        state = {"m": local[mom_key]} if mom_key in local else {}
        new_state, params = opt.apply(g, state, params, lr=self.lr, mask=mask, inplace=True)
        if new_state:
            new[mom_key] = new_state["m"]
        return params

    def client_step(
        self, local: dict[str, Any], down: dict[str, Any], batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        params = local["params"]
        g, (loss, buffers) = grad(self.loss_fn, has_aux=True)(
            params, local["buffers"], batch["x"], batch["y"], batch["w"]
        )
        new = dict(local, buffers=buffers, steps=local["steps"] + 1)
        new["params"] = self.sgd(params, self.correct_grad(g, local, down), local, new)
        return new, loss

    def client_final(
        self, local: dict[str, Any], down: dict[str, Any], cstate: Any
    ) -> tuple[dict[str, Any], Any]:
        return {"params": local["params"], "buffers": local["buffers"]}, {}
