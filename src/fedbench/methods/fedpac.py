"""FedPAC (Xu, Tong and Huang, ICLR 2023): personalised FL with feature alignment and classifier
collaboration. Follows the official code (JianXu95/FedPAC, methods/fedpac.py, tools.py, running.py).

A client's model is the global feature extractor (`body.*`, shared, averaged by data size) and its own
linear classifier (`head.*`, private). One local round, by epochs over the client's data:
  1. `head_epochs` (1): the classifier alone on frozen features, lr `head_lr` (0.1). The features of
     the first epoch are those of the round's starting extractor: from them the client's statistics
     for the server are accumulated (class sizes, means mu_k and mean squared norms), and its
     "local prototypes before training" (the fallback target of classes the server has no prototype for).
  2. `body_epochs` (5): the extractor alone, lr = the run's lr, loss CE + `lam` * MSE(f(x), P_y) to the
     global prototype of the sample's class (no alignment while the server has no prototypes yet).
  3. one pass without updates: the class means of the trained extractor's features (local prototypes).
SGD with momentum 0.5 and weight decay 5e-4 in both phases, each phase's momentum starting at 0.

Uplink: body (+ buffers), classifier, prototypes + class sizes, V_i and H_i. Server: the body averaged by
data size; global prototypes = per-class size-weighted means (only classes this cohort holds); for each
participant i, combination weights alpha = argmin alpha^T (diag(V) + D_i) alpha on the simplex, where
D_i[j, l] = sum_k (H_i,k - H_j,k) . (H_i,k - H_l,k), H_j,k = p_j(k) mu_j,k, V_j = (sum_k p_j(k) E_k||f||^2
- p_j(k)^2 ||mu_j,k||^2) / n_j (the official code's division by n_j kept). Weights below `weight_eps` are
zeroed and the rest renormalised; client i's classifier becomes sum_j alpha_j phi_j, sent back to it
(counted as downlink). The QP is solved exactly by an active-set method (`simplex_qp`).
"""

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


def simplex_qp(p: torch.Tensor, tol: float = 1e-12, max_iter: int = 500) -> torch.Tensor:
    """argmin_a a^T P a subject to sum(a) = 1, a >= 0, for a symmetric PSD P (K x K, small): a primal
    active-set method, exact up to the linear solves. Starts from the uniform weights."""
    p = p.detach().to(torch.float64, copy=True).cpu()
    k = p.shape[0]
    a = torch.full((k,), 1.0 / k, dtype=torch.float64)
    at_zero = torch.zeros(k, dtype=torch.bool)
    for _ in range(max_iter):
        free = (~at_zero).nonzero().flatten()
        m = len(free)
        kkt = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        kkt[:m, :m] = 2 * p[free][:, free]
        kkt[:m, m] = 1.0
        kkt[m, :m] = 1.0
        rhs = torch.zeros(m + 1, dtype=torch.float64)
        rhs[m] = 1.0
        sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        target = torch.zeros(k, dtype=torch.float64)
        target[free] = sol[:m]
        step = target - a
        if float(step.abs().max()) <= 1e-12:
            grad_ = 2 * p @ a
            lam = float(grad_[free].mean())
            slack = grad_ - lam  # the multipliers of a_j >= 0 for j at zero
            slack[~at_zero] = 0.0
            j = int(slack.argmin())
            if float(slack[j]) >= -tol:
                return a
            at_zero[j] = False
            continue
        shrinking = (step < 0) & ~at_zero
        ratios = torch.where(shrinking, -a / step.where(shrinking, torch.ones_like(step)), torch.full_like(a, 2.0))
        t = min(1.0, float(ratios.min()))
        a = (a + t * step).clamp_min(0.0)
        if t < 1.0:
            at_zero[int(ratios.argmin())] = True
            a[at_zero] = 0.0
        a = a / a.sum()
    return a


@dataclasses.dataclass(frozen=True)
class FedPACConfig(PersonalConfig):
    momentum: float = spec(0.5, ge=0, lt=1)  # the official code's SGD (both phases)
    weight_decay: float = spec(5e-4, ge=0)
    lam: float = spec(1.0, ge=0)  # weight of the feature alignment (MSE to the global prototypes)
    head_epochs: int = spec(1, ge=1)  # classifier epochs per round (official: 1)
    body_epochs: int = spec(5, ge=0)  # extractor epochs per round (official: --local_epoch 5)
    # the classifier's learning rate (official: 0.1; the body uses lr)
    head_lr: float = spec(0.1, gt=0)
    combine: bool = True            # classifier collaboration (false: every client keeps its own classifier)
    # combination weights below this are zeroed (official)
    weight_eps: float = spec(1e-3, ge=0, lt=1)

    def __post_init__(self) -> None:
        super().__post_init__()


@register("method", "fedpac")
class FedPAC(PersonalizedMethod):
    name = "fedpac"
    Config = FedPACConfig
    step_size_keys = ("server_lr", "head_lr")
    shared = "body"
    two_extractors = True
    needs_progress = True

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        if "head.weight" not in ctx.params or ctx.params["head.weight"].dim() != 2:
            raise ConfigError("method=fedpac needs a linear classifier head (head.weight)")
        self.feature_dim = int(ctx.params["head.weight"].shape[1])
        self.head_keys = [k for k in ctx.params if k.startswith("head.")]

    def local_epochs(self, configured: int) -> int:
        return self.cfg.head_epochs + self.cfg.body_epochs + 1  # + the prototype pass

    def init_global(self, params: Tensors, buffers: Tensors) -> dict[str, Any]:
        ref = params["head.weight"]
        return {"params": params, "buffers": buffers,
                "protos": ref.new_zeros(self.num_classes, self.feature_dim),
                "counts": ref.new_zeros(self.num_classes)}

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        down = super().broadcast(gstate, ctx)
        return Payload({**down.tensors, "protos": gstate["protos"], "counts": gstate["counts"]})

    # ---- client ----------------------------------------------------------------------------
    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        local = super().client_init(down, cstate, client_id)
        z = down["protos"]
        local.update(first_sum=torch.zeros_like(z), first_cnt=torch.zeros_like(down["counts"]),
                     first_sq=torch.zeros_like(down["counts"]), last_sum=torch.zeros_like(z),
                     last_cnt=torch.zeros_like(down["counts"]))
        local["mom"] = {k: torch.zeros_like(v) for k, v in local["params"].items()}
        return local

    def phases(self, progress: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(first epoch, head phase, body phase, prototype pass) as 0/1, from the step's epoch position."""
        c = self.cfg
        epoch = progress * (c.head_epochs + c.body_epochs + 1) + 1e-6  # robust to rounding at the edges
        first = (epoch < 1).to(progress.dtype)
        head = (epoch < c.head_epochs).to(progress.dtype)
        body = ((epoch >= c.head_epochs) & (epoch < c.head_epochs + c.body_epochs)).to(progress.dtype)
        return first, head, body, 1.0 - head - body

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        w, y = batch["w"], batch["y"]
        first, head_phase, body_phase, _ = self.phases(batch["progress"].to(w.dtype))
        # the alignment target: the global prototype of y, else the client's own from before training
        own = local["first_sum"] / local["first_cnt"].clamp_min(1.0).unsqueeze(-1)
        known = (down["counts"] > 0).unsqueeze(-1)
        target = torch.where(known, down["protos"], own)[y]
        align = (down["counts"].sum() > 0).to(w.dtype) * body_phase * self.cfg.lam

        def loss_fn(params: Tensors):
            h, buffers = self.features_and_buffers(params, local["buffers"], batch["x"])
            ce = self.weighted_ce(self.classify(params, h), batch)
            mse = (((h - target) ** 2).mean(-1) * w).sum() / w.sum().clamp_min(1.0)
            return ce + align * mse, (ce.detach(), h.detach(), buffers)

        g, (ce, h, buffers) = grad(loss_fn, has_aux=True)(local["params"])
        new = dict(local, buffers=buffers, steps=local["steps"] + 1)
        new["params"], new["mom"] = self.phase_sgd(local, g, head_phase, body_phase)
        onehot = F.one_hot(y, self.num_classes).to(h.dtype) * w.unsqueeze(-1)
        first_hot, last_hot = onehot * first, onehot * (1.0 - head_phase - body_phase)
        new["first_sum"] = local["first_sum"] + first_hot.T @ h
        new["first_cnt"] = local["first_cnt"] + first_hot.sum(0)
        new["first_sq"] = local["first_sq"] + first_hot.T @ (h * h).sum(-1)
        new["last_sum"] = local["last_sum"] + last_hot.T @ h
        new["last_cnt"] = local["last_cnt"] + last_hot.sum(0)
        return new, ce

    def phase_sgd(self, local: dict[str, Any], g: Tensors, head_phase: torch.Tensor,
                  body_phase: torch.Tensor) -> tuple[Tensors, Tensors]:
        """SGD with momentum and weight decay on the phase's parameters only (the others keep zero momentum:
        each phase starts its momentum at 0, as a fresh optimizer does); the head at head_lr."""
        params, new_params, new_mom = local["params"], {}, {}
        body_keys = [k for k in params if k not in self.head_keys]
        for keys, on, lr in ((self.head_keys, head_phase, self.cfg.head_lr), (body_keys, body_phase, self.lr)):
            keys = [k for k in keys if k in params]
            state = {"m": {k: local["mom"][k] * on for k in keys}}  # a phase's momentum starts at 0
            opt_state, stepped = self.client_opt.apply({k: g[k] for k in keys}, state, {k: params[k] for k in keys},
                                                       lr=lr, mask=dict.fromkeys(keys, on))
            new_params.update(stepped)
            new_mom.update(opt_state["m"] if opt_state else state["m"])  # momentum 0: no state kept
        return {k: new_params[k] for k in params}, {k: new_mom[k] for k in params}

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        up, keep = super().client_final(local, down, cstate)
        n_k = local["first_cnt"]
        n = n_k.sum().clamp_min(1.0)
        mu = local["first_sum"] / n_k.clamp_min(1.0).unsqueeze(-1)
        p_k = n_k / n
        variance = (p_k * local["first_sq"] / n_k.clamp_min(1.0) - p_k ** 2 * (mu * mu).sum(-1)).sum() / n
        up.update(head={k: local["params"][k] for k in self.head_keys},
                  protos=local["last_sum"] / local["last_cnt"].clamp_min(1.0).unsqueeze(-1),
                  counts=local["last_cnt"], var=variance, h_ref=p_k.unsqueeze(-1) * mu)
        return up, keep

    # ---- server ----------------------------------------------------------------------------
    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        new = self.average(gstate, {"params": up["params"], "buffers": up["buffers"]}, ctx.sizes)
        counts = up["counts"].sum(0)
        protos = (up["protos"] * up["counts"].unsqueeze(-1)).sum(0) / counts.clamp_min(1.0).unsqueeze(-1)
        # only the classes this cohort holds have a global prototype this round (as the official code)
        new.update(protos=protos * (counts > 0).unsqueeze(-1), counts=counts)
        return new, {}

    def combination_weights(self, variance: torch.Tensor, h_ref: torch.Tensor) -> torch.Tensor:
        """[K, K]: row i holds client i's weights over the cohort's classifiers."""
        k = len(variance)
        flat = h_ref.reshape(k, -1).to(torch.float64)
        rows = []
        for i in range(k):
            delta = flat[i] - flat  # [K, C*d]
            alpha = simplex_qp(torch.diag(variance.to(torch.float64)) + delta @ delta.T)
            alpha = alpha * (alpha > self.cfg.weight_eps)
            rows.append(alpha / alpha.sum())
        return torch.stack(rows).to(device=variance.device, dtype=variance.dtype)

    def personalize(self, gstate: dict[str, Any], cohort_states: Any, up: dict[str, Any],
                    ctx: RoundContext) -> tuple[Any, Payload | None]:
        if not self.cfg.combine:
            return cohort_states, None
        weights = self.combination_weights(up["var"], up["h_ref"])
        heads = {k: torch.tensordot(weights, v, dims=1) for k, v in up["head"].items()}
        private = {**cohort_states["private"], **heads}
        return {**cohort_states, "private": private}, Payload({"head": heads}, stacked=True)
