"""FLoPS and FLoPS-PA (arXiv 2512.23071): federated learning under an L0 density constraint with
hard-concrete gates. The full text was not available; the schedule details are reconstructed and all
of them are config options (GatedConfig / FLoPSConfig below).

theta = theta_tilde * z on the gated parameters, z ~ HardConcrete(log_alpha). The server holds
(theta_tilde, log_alpha, lambda) and minimises E_z[loss] + lambda * c(log_alpha) with
c = mean_j P(z_j != 0) - rho; lambda follows projected ascent with a restart to 0 whenever c <= 0.
After `prune_start` rounds the server scales the gates apart so that exactly m = floor(rho * D) of the
deterministic gates stay open.

- `flops` (FedSGD): each client draws one gate sample per step and uploads its gradients w.r.t.
  theta_tilde and log_alpha; the server steps both.
- `flops_pa`: clients run local SGD on (theta_tilde, log_alpha) with the broadcast lambda fixed, and
  only the ACTIVE coordinates (deterministic gate > 0) travel, as values + indices or bitmask.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from fedbench.config import MethodConfig, spec
from fedbench.engine.functional import grad, weighted_mean
from fedbench.engine.optim import sgd_step
from fedbench.engine.protocol import RoundContext, RunContext
from fedbench.errors import ConfigError
from fedbench.methods.base import Method, Tensors
from fedbench.metrics.comm import SPARSE_GROUP, Payload
from fedbench.models.gates import (
    DETERMINISTIC_RULES,
    GateLayout,
    closed_below,
    deterministic_gate,
    init_log_alpha,
    prob_nonzero,
    sample_gate,
)
from fedbench.registry import register


def select_gated(params: Tensors, rule: str) -> list[str]:
    """`weights`: every parameter with >= 2 dims (biases not gated); `all`; or a regular expression."""
    if rule == "weights":
        names = [n for n, p in params.items() if p.dim() >= 2]
    elif rule == "all":
        names = list(params)
    else:
        try:
            pattern = re.compile(rule)
        except re.error as e:
            raise ConfigError(f"method.gated={rule!r} is not a valid regular expression ({e})") from e
        names = [n for n in params if pattern.search(n)]
    if not names:
        raise ConfigError(f"method.gated={rule!r} matches no parameter; parameters are: {', '.join(params)}")
    return names


def check_prune_start(prune_start: int | None, total_rounds: int) -> None:
    if prune_start is not None and not 0 <= prune_start <= total_rounds:
        raise ConfigError(f"method.prune_start={prune_start}: must be an integer in [0, rounds={total_rounds}]")


@dataclasses.dataclass(frozen=True)
class SparsityConfig(MethodConfig):
    # rho: the final model keeps floor(rho * D) of the D gated entries
    target_density: float = spec(0.05, gt=0, le=1)
    # round from which the server scales the gates apart (null: never)
    prune_start: int | None = spec(None, ge=0)
    # weights (tensors with >= 2 dims; biases not gated) | all | a regex on names
    gated: str = spec("weights", nonempty=True)

    def __post_init__(self) -> None:  # subclasses call it for their cross-key checks
        return None


@dataclasses.dataclass(frozen=True)
class GatedConfig(SparsityConfig):
    """Shared by FLoPS and FLoPS-PA. The schedule details are RECONSTRUCTED (see the README)."""

    rho_init: float = spec(0.95, gt=0, lt=1)  # dense start: sigmoid(log_alpha) = rho_init
    log_alpha_init_std: float = spec(0.01, ge=0)
    log_alpha_max: float = spec(10.0, gt=0)  # |log_alpha| clamp; 10 allows P(z != 0) down to 2e-4
    eta_phi: float = spec(0.05, ge=0)  # server step on log_alpha (FLoPS-PA: of the penalty)
    eta_lambda: float | None = spec(0.1, ge=0)  # dual step on the mean constraint (null: 1/D)
    # sum: per-gate L0 gradient | mean: of the mean constraint (/D)
    penalty: str = spec("sum", choices=("sum", "mean"))
    scale_factor: float = spec(0.5, ge=0)  # gate scaling step after prune_start ...
    decay: float = spec(1.0, gt=0)  # ... times decay^(round - prune_start)
    # exact m open gates: final (last round) | always | never
    project: str = spec("final", choices=("final", "always", "never"))
    # saliency: P(z != 0) * |theta_tilde| | log_alpha
    rank_by: str = spec("saliency", choices=("saliency", "log_alpha"))
    project_margin: float = spec(0.5, ge=0)
    gate_seed: int = spec(0, ge=0)
    # how the scaling moves log_alpha: additive (+- step) | multiplicative (+- step x |log_alpha|: each
    # gate moves in proportion to how decided it already is; step decays by `decay` per round)
    scaling: str = spec("additive", choices=("additive", "multiplicative"))
    # the first scaled round: prune_start itself (at) | the round after it (after: "epoch > prune_start")
    scale_from: str = spec("at", choices=("at", "after"))
    # the test-time gate: louizos (sigmoid(log_alpha) stretched) | gallego_posada (sigmoid(log_alpha /
    # beta) x 1.2 - 0.1, Gallego-Posada et al. 2022), clipped to [0, 1]
    deterministic: str = spec("louizos", choices=DETERMINISTIC_RULES)


@dataclasses.dataclass(frozen=True)
class FLoPSConfig(GatedConfig):
    eta_theta: float = spec(0.05, gt=0)  # server step on theta_tilde
    lr_decay: float = spec(1.0, gt=0)  # multiply eta_theta and eta_phi by this every round


@dataclasses.dataclass(frozen=True)
class FLoPSPAConfig(GatedConfig):
    eta_phi_local: float = spec(0.05, ge=0)  # client step on log_alpha
    # the clients' penalty: mean (lambda x the mean constraint: d/d log_alpha carries 1/D, while the
    # server steps on `penalty`'s scale) | server (the same per-gate scale as the server's `penalty`)
    client_penalty: str = spec("mean", choices=("mean", "server"))


class GatedMethod(Method):
    """Shared state and server logic of FLoPS and FLoPS-PA."""

    fusable = True
    # the server's (each run its own); the clients read only the broadcast and the lr
    run_keys = ("target_density", "prune_start", "eta_phi", "eta_lambda", "scale_factor", "decay",
                "project_margin", "rho_init", "log_alpha_init_std", "gate_seed")

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        check_prune_start(self.cfg.prune_start, ctx.total_rounds)
        self.rho = self.cfg.target_density
        self.layout = GateLayout.build(ctx.params, select_gated(ctx.params, self.cfg.gated))
        self.noise_dim = self.layout.size  # one uniform draw per gate per step (not per sample)
        self.m = max(1, math.floor(self.rho * self.layout.size))
        self.la_max = self.cfg.log_alpha_max

    def init_global(self, params: Tensors, buffers: Tensors) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.cfg.gate_seed)
        la = init_log_alpha(self.layout.size, self.cfg.rho_init, self.cfg.log_alpha_init_std, g,
                            next(iter(params.values())).dtype).to(self.device)
        zero = torch.zeros((), dtype=la.dtype, device=la.device)
        return {"params": params, "buffers": buffers, "la": la, "lam": zero, "constraint": zero}

    # ---- model views ---------------------------------------------------------------------
    def effective(self, params: Tensors, la: torch.Tensor, u: torch.Tensor) -> Tensors:
        z = self.layout.split(sample_gate(la, u))
        return {k: params[k] * z[k] if k in z else params[k] for k in params}

    def eval_state(self, gstate: dict[str, Any]) -> tuple[Tensors, Tensors]:
        z = self.layout.split(deterministic_gate(gstate["la"], self.cfg.deterministic))
        params = {k: v * z[k] if k in z else v for k, v in gstate["params"].items()}
        return params, gstate["buffers"]

    def gated_final(self, gstate: dict[str, Any]) -> Tensors:
        params, _ = self.eval_state(gstate)
        return {k: params[k] for k in self.layout.names}

    def expected_density(self, gstate: dict[str, Any]) -> float:
        return float(prob_nonzero(gstate["la"]).mean())

    def server_metrics(self, gstate: dict[str, Any]) -> dict[str, Any]:
        return {"flops/lambda": gstate["lam"], "flops/constraint": gstate["constraint"]}

    # ---- server: dual ascent with restart, gate scaling --------------------------------------
    def constraint(self, la: torch.Tensor) -> torch.Tensor:
        return prob_nonzero(la).mean() - self.rho

    def constraint_grad(self, la: torch.Tensor) -> torch.Tensor:
        """Gradient of the penalty on log_alpha. `penalty=mean` is d c / d log_alpha with c the MEAN of
        P(z != 0) (tiny per gate when D is large); `penalty=sum` (default) is the per-gate L0 surrogate
        gradient, i.e. the Lagrangian on sum_j P_j - rho D with lambda rescaled by D (reconstructed)."""
        p = prob_nonzero(la)
        scale = 1.0 / la.numel() if self.cfg.penalty == "mean" else 1.0
        return p * (1 - p) * scale

    def dual_update(self, lam: torch.Tensor, la: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.constraint(la)
        eta = self.cfg.eta_lambda or 1.0 / la.numel()
        lam = torch.clamp(lam + eta * c, min=0.0)
        lam = torch.where(c <= 0, torch.zeros_like(lam), lam)  # dual restart once the constraint holds
        return lam, c

    def ranking_score(self, la: torch.Tensor, params: Tensors) -> torch.Tensor:
        """`rank_by=log_alpha`: the gate parameter itself. `saliency` (default): P(z != 0) * |theta_tilde|,
        which still ranks sensibly when the gates have not separated yet (large models early on)."""
        if self.cfg.rank_by == "log_alpha":
            return la
        return prob_nonzero(la) * self.layout.flatten(params).abs()

    def scale_gates(self, la: torch.Tensor, params: Tensors, round_: int) -> torch.Tensor:
        """After prune_start: push the top-m gates up and the rest down by scale_factor *
        decay^(round - prune_start) each round (a gradual separation), and project so that exactly m
        deterministic gates are open: in the last round (`project=final`, default), every round
        (`always`) or never. Reconstructed rule; all of it is config."""
        start = self.cfg.prune_start
        if start is None or round_ < start or (self.cfg.scale_from == "after" and round_ == start):
            return la
        step = self.cfg.scale_factor * self.cfg.decay ** (round_ - start)
        top = torch.zeros_like(la, dtype=torch.bool)
        top[torch.topk(self.ranking_score(la, params), self.m).indices] = True
        move = step * la.abs() if self.cfg.scaling == "multiplicative" else step
        la = torch.where(top, la + move, la - move)
        project = self.cfg.project
        if project == "always" or (project == "final" and round_ == self.total_rounds):
            margin, closed = self.cfg.project_margin, closed_below(self.cfg.deterministic)
            la = torch.where(top, la.clamp(min=closed + margin), la.clamp(max=closed - margin))
        return la.clamp(-self.la_max, self.la_max)

    def lr_at(self, base: float, round_: int) -> float:
        return base * self.cfg.lr_decay ** (round_ - 1)


@register("method", "flops")
class FLoPS(GatedMethod):
    name = "flops"
    Config = FLoPSConfig
    step_size_keys = ("eta_theta", "eta_phi", "eta_lambda")
    run_keys = (*GatedMethod.run_keys, "eta_theta", "lr_decay")

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        return Payload({"params": gstate["params"], "buffers": gstate["buffers"], "la": gstate["la"]})

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        dtype = down["la"].dtype
        return {"g_theta": {k: torch.zeros_like(v) for k, v in down["params"].items()},
                "g_la": torch.zeros_like(down["la"]), "steps": torch.zeros((), dtype=dtype, device=client_id.device)}

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        def objective(params: Tensors, la: torch.Tensor):
            return self.loss_fn(self.effective(params, la, batch["noise"]), down["buffers"], batch["x"], batch["y"],
                                batch["w"])

        (g_theta, g_la), (loss, _) = grad(objective, argnums=(0, 1), has_aux=True)(down["params"], down["la"])
        new = {"g_theta": {k: local["g_theta"][k] + g_theta[k] for k in g_theta}, "g_la": local["g_la"] + g_la,
               "steps": local["steps"] + 1}
        return new, loss

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        n = local["steps"].clamp_min(1.0)  # FedSGD: the mean gradient of the client's minibatch(es)
        return {"g_theta": {k: v / n for k, v in local["g_theta"].items()}, "g_la": local["g_la"] / n}, {}

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        round_ = ctx.round
        g = weighted_mean(up, ctx.sizes)
        eta_theta = self.lr_at(self.cfg.eta_theta, round_)
        eta_phi = self.lr_at(self.cfg.eta_phi, round_)
        params = sgd_step(gstate["params"], g["g_theta"], eta_theta)  # FedSGD on the weights
        la = gstate["la"] - eta_phi * (g["g_la"] + gstate["lam"] * self.constraint_grad(gstate["la"]))
        la = la.clamp(-self.la_max, self.la_max)
        lam, _ = self.dual_update(gstate["lam"], la)
        la = self.scale_gates(la, params, round_)
        new = dict(gstate, params=params, la=la, lam=lam, constraint=self.constraint(la))
        return new, self.server_metrics(new)


@register("method", "flops_pa")
class FLoPSPA(GatedMethod):
    name = "flops_pa"
    Config = FLoPSPAConfig
    step_size_keys = ("eta_phi", "eta_phi_local", "eta_lambda")
    run_keys = (*GatedMethod.run_keys, "eta_phi_local")
    client_run_keys = ("eta_phi_local",)

    def active(self, la: torch.Tensor) -> torch.Tensor:
        return deterministic_gate(la, self.cfg.deterministic) > 0

    def client_penalty(self, la: torch.Tensor) -> torch.Tensor:
        """`client_penalty=mean`: the mean constraint (its gradient p(1 - p) / D); `server`: the penalty
        whose gradient is the server's `constraint_grad` (per gate p(1 - p) for penalty=sum)."""
        if self.cfg.client_penalty == "mean" or self.cfg.penalty == "mean":
            return self.constraint(la)
        return prob_nonzero(la).sum()

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        mask = self.active(gstate["la"])
        gated = self.layout.flatten(gstate["params"])
        ungated = {k: v for k, v in gstate["params"].items() if k not in self.layout.names}
        return Payload({"active": {"mask": mask, "theta": torch.where(mask, gated, 0.0),
                                   "la": torch.where(mask, gstate["la"], 0.0)},
                        "ungated": ungated, "buffers": gstate["buffers"], "lam": gstate["lam"]},
                       encodings={"active": SPARSE_GROUP})

    def _unpack(self, down: dict[str, Any]) -> tuple[Tensors, torch.Tensor]:
        """Client side: inactive gates are closed (log_alpha = -max) and their weights 0."""
        act = down["active"]
        params = dict(down["ungated"])
        params.update(self.layout.split(act["theta"]))
        la = torch.where(act["mask"], act["la"], torch.full_like(act["la"], -self.la_max))
        return params, la

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        params, la = self._unpack(down)
        return {"params": params, "la": la}

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        lam = down["lam"]

        def objective(params: Tensors, la: torch.Tensor):
            loss, aux = self.loss_fn(self.effective(params, la, batch["noise"]), down["buffers"], batch["x"],
                                     batch["y"], batch["w"])
            return loss + lam * self.client_penalty(la), aux

        (g_p, g_la), (loss, _) = grad(objective, argnums=(0, 1), has_aux=True)(local["params"], local["la"])
        mask = down["active"]["mask"]
        g_gated = self.layout.split(torch.where(mask, self.layout.flatten(g_p), 0.0))
        g_p = {k: g_gated.get(k, g_p[k]) for k in g_p}  # inactive coordinates stay where they are
        eta_phi = self.cfg.eta_phi_local
        params = sgd_step(local["params"], g_p, self.lr)
        la = local["la"] - eta_phi * torch.where(mask, g_la, 0.0)
        return {"params": params, "la": la}, loss

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        mask = down["active"]["mask"]
        up = {"active": {"mask": mask, "theta": torch.where(mask, self.layout.flatten(local["params"]), 0.0),
                         "la": torch.where(mask, local["la"], 0.0)},
              "ungated": {k: v for k, v in local["params"].items() if k not in self.layout.names}}
        return up, {}

    def uplink(self, stacked_up: dict[str, Any]) -> Payload:
        return Payload(stacked_up, encodings={"active": SPARSE_GROUP}, stacked=True)

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        mask = self.active(gstate["la"])
        avg = weighted_mean({"theta": up["active"]["theta"], "la": up["active"]["la"], "ungated": up["ungated"]},
                            ctx.sizes)
        gated = torch.where(mask, avg["theta"], self.layout.flatten(gstate["params"]))
        params = dict(gstate["params"])
        params.update(avg["ungated"])
        params.update(self.layout.split(gated))
        la = torch.where(mask, avg["la"], gstate["la"])
        # the dual variable and the gate scaling stay on the server
        la = la - self.cfg.eta_phi * gstate["lam"] * self.constraint_grad(la)
        la = la.clamp(-self.la_max, self.la_max)
        lam, _ = self.dual_update(gstate["lam"], la)
        la = self.scale_gates(la, params, ctx.round)
        new = dict(gstate, params=params, la=la, lam=lam, constraint=self.constraint(la))
        return new, self.server_metrics(new)
