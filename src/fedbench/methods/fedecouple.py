"""FedeCouple (arXiv 2511.09599). The full text was not available: components from the abstract,
formulas reconstructed (every choice below is a key of FedeCoupleConfig).

Server: a global extractor theta (`body.*`) and a global classifier phi_g (`head.*`). Client i keeps a
personal classifier phi_i and class anchors A_i across rounds (stacked [N, ...] client state). One local
round, phases by the share of the client's local steps (`phase_fractions`, in `phase_order`):
  glf_global: train theta with phi_g frozen: CE(g(f(x); phi_g), y) + mu * ||f(x) - a_y||^2   (GLF + GFA)
  gpc:        train phi_i on frozen features: CE(g(h; phi_i), y)
              + kappa_t * tau^2 * KL(softmax(g(h; phi_g)/tau) || softmax(g(h; phi_i)/tau))   (GPC)
  glf_local:  train theta with phi_i frozen: CE(g(f(x); phi_i), y) + mu_local * ||f(x) - a_y||^2
Anchors: `ema` (running class means of the client's own features), `global` (the class centroids of
the GLOBAL extractor's features - the one the client received this round, frozen - over the client's
own samples: running means over the round's steps, exact once every sample has been seen; the
reviews' "global feature anchors" read without extra communication) or `seeded` (fixed random anchors
from a shared seed: the same on every client). Anchors never enter a payload.
Local budget: `phase_fractions` of the run's local epochs, or `phase_epochs` (whole epochs per phase,
their sum the local epochs: [3, 1, 2] is FedPAC's budget of 1 classifier + 5 extractor epochs).
Uplink: theta_i and phi_i (FedAvg's bytes); phi_g becomes the aggregate of the phi_i. Aggregation
weights: n_i * exp(cos(delta_i, mean delta) / temperature), normalised and clipped to
[clip_low, clip_high] / K (fair, similarity-based). Evaluation (`eval_extractor`): `local` (the spec's
protocol) - client i predicts with g(f(x; theta_i); phi_i), its own extractor after its last round, kept
as stacked [N, ...] client state like Ditto's personal models (a client never sampled uses the global
theta); `global` - g(f(x; theta); phi_i), no per-client extractor in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fedbench.config import spec
from fedbench.engine.functional import grad
from fedbench.engine.optim import sgd_step
from fedbench.engine.protocol import RoundContext, RunContext
from fedbench.errors import ConfigError
from fedbench.methods.base import Tensors
from fedbench.methods.personal import PersonalConfig, PersonalizedMethod, per_client
from fedbench.metrics.comm import Payload
from fedbench.registry import register

PHASES = ("glf_global", "gpc", "glf_local")


def fair_weights(sizes: torch.Tensor, similarity: torch.Tensor, temperature: float, clip_low: float,
                 clip_high: float, iterations: int = 100) -> torch.Tensor:
    """n_i * exp(s_i / T), normalised, then each weight held in [clip_low, clip_high] / K.

    Alternating clamp and renormalisation converges because the box contains the uniform weights
    (clip_low <= 1 <= clip_high); the result sums to 1 and respects the bounds."""
    k = len(sizes)
    w = sizes * torch.exp((similarity - similarity.max()) / temperature)
    w = w / w.sum()
    lo, hi = clip_low / k, clip_high / k
    for _ in range(iterations):
        w = w.clamp(lo, hi)
        w = w / w.sum()
        if bool(((w >= lo - 1e-12) & (w <= hi + 1e-12)).all()):
            break
    return w


@dataclasses.dataclass(frozen=True)
class FedeCoupleConfig(PersonalConfig):
    # any ordering / subset of the three phases
    phase_order: tuple[str, ...] = spec(PHASES, choices=PHASES)
    # share of each client's local steps per phase
    phase_fractions: tuple[float, ...] = spec((0.5, 0.2, 0.3), ge=0, le=1)
    # null: phase_fractions of the run's local epochs | whole local epochs per phase (their sum the
    # round's local epochs, the run's local_epochs then does not apply)
    phase_epochs: tuple[int, ...] | None = None
    # ema: running class means of the client's own features | global: class centroids of the received
    # global extractor's features on the client's samples | seeded: shared fixed
    anchors: str = spec("ema", choices=("ema", "global", "seeded"))
    anchor_momentum: float = spec(0.9, ge=0, lt=1)  # ema anchors
    anchor_seed: int = spec(0, ge=0)  # seeded anchors
    anchor_scale: float = spec(1.0, gt=0)
    anchor_weight: float = spec(1.0, ge=0)  # mu: anchor (center) loss in glf_global
    anchor_weight_local: float = spec(0.0, ge=0)  # anchor loss in glf_local
    kd_weight: float = spec(1.0, ge=0)  # kappa_0 of the GPC distillation
    # linear_decay: kappa_t = kappa_0 (1 - (t-1)/R) | constant
    kd_schedule: str = spec("linear_decay", choices=("linear_decay", "constant"))
    kd_temperature: float = spec(2.0, gt=0)
    # aggregation weight ~ n_i exp(cos(delta_i, mean delta) / T)
    sim_temperature: float = spec(1.0, gt=0)
    clip_low: float = spec(0.5, ge=0)  # each weight held in [clip_low, clip_high] / K
    clip_high: float = spec(2.0, gt=0)
    # local: client i predicts with its own extractor | global
    eval_extractor: str = spec("local", choices=("local", "global"))

    def __post_init__(self) -> None:
        super().__post_init__()
        order = list(self.phase_order)
        if not order or len(set(order)) != len(order) or not set(order) <= set(PHASES):
            raise ConfigError(f"method.phase_order={order}: a non-empty ordering of distinct phases from "
                              f"{list(PHASES)}")
        fr = list(self.phase_fractions)
        if len(fr) != len(order) or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
            raise ConfigError(f"method.phase_fractions={fr}: {len(order)} non-negative shares summing to 1")
        if self.phase_epochs is not None:
            ep = list(self.phase_epochs)
            if len(ep) != len(order) or any(e < 0 for e in ep) or sum(ep) < 1:
                raise ConfigError(f"method.phase_epochs={ep}: {len(order)} whole epochs >= 0 (one per phase of "
                                  f"method.phase_order), at least one in all; or null")
        if self.clip_low > self.clip_high:
            raise ConfigError(f"method.clip_low={self.clip_low:g} > method.clip_high={self.clip_high:g}: the "
                              f"aggregation weights are held in [clip_low, clip_high] / K; clip_low <= clip_high")


@register("method", "fedecouple")
class FedeCouple(PersonalizedMethod):
    name = "fedecouple"
    Config = FedeCoupleConfig
    shared = "all"  # theta and phi_g live on the server; phi_i is extra client state
    has_global_model = True
    needs_progress = True
    two_extractors = True

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        params = ctx.params
        self.head_keys = [k for k in params if k.startswith("head.")]
        # phase edges on the scale of `progress x phase_scale` (whole epochs with phase_epochs, shifted by
        # phase_eps so that rounding never puts an epoch's first step in the previous phase)
        shares = self.cfg.phase_fractions if self.cfg.phase_epochs is None else self.cfg.phase_epochs
        self.phase_scale = 1.0 if self.cfg.phase_epochs is None else float(sum(self.cfg.phase_epochs))
        self.phase_eps = 0.0 if self.cfg.phase_epochs is None else 1e-6
        edges = torch.cumsum(torch.tensor([0.0, *shares], dtype=torch.float64), 0).tolist()
        self.phase_span = {p: (edges[i], edges[i + 1]) for i, p in enumerate(self.cfg.phase_order)}
        self.feature_dim = int(params["head.weight"].shape[1])
        ref = params["head.weight"]
        gen = torch.Generator().manual_seed(self.cfg.anchor_seed)
        self.seeded_anchors = (torch.randn(self.num_classes, self.feature_dim, generator=gen, dtype=torch.float64)
                               * self.cfg.anchor_scale).to(ref.device, ref.dtype)

    # ---- state -----------------------------------------------------------------------------
    def init_client_states(self, gstate: dict[str, Any], n_clients: int) -> dict[str, Any]:
        p = gstate["params"]
        ref = p["head.weight"]
        state: dict[str, Any] = {
            "private": {k: per_client(p[k], n_clients) for k in self.head_keys},   # personal classifier
            "anchors": ref.new_zeros(n_clients, self.num_classes, self.feature_dim),
            "anchor_seen": ref.new_zeros(n_clients, self.num_classes)}
        return {**state, **self.init_extractor_state(gstate, n_clients)}

    @property
    def default_extractor(self) -> str:
        return "own" if self.cfg.eval_extractor == "local" else "global"

    def local_epochs(self, configured: int) -> int:
        return configured if self.cfg.phase_epochs is None else sum(self.cfg.phase_epochs)

    def kappa(self, round_: int) -> float:
        k0 = self.cfg.kd_weight
        if self.cfg.kd_schedule == "constant":
            return k0
        return k0 * (1.0 - (round_ - 1) / max(self.total_rounds, 1))

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        payload = super().broadcast(gstate, ctx)
        # the distillation weight of this round travels with the model (4 bytes)
        payload.tensors["kappa"] = gstate["params"]["head.weight"].new_tensor(self.kappa(ctx.round))
        return payload

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        local = super().client_init(down, {}, client_id)
        local["phead"] = {k: cstate["private"][k].clone() for k in self.head_keys}
        local["anchors"], local["anchor_seen"] = cstate["anchors"].clone(), cstate["anchor_seen"].clone()
        if self.cfg.anchors == "global":  # this round's extractor: centroids start again from nothing
            local["anchor_sum"] = torch.zeros_like(local["anchors"])
            local["anchor_seen"] = torch.zeros_like(local["anchor_seen"])
        return local

    # ---- local training --------------------------------------------------------------------
    def _in_phase(self, name: str, progress: torch.Tensor) -> torch.Tensor:
        if name not in self.phase_span:
            return torch.zeros_like(progress)
        lo, hi = self.phase_span[name]
        position = progress * self.phase_scale + self.phase_eps
        return ((position >= lo) & (position < hi)).to(progress.dtype)

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        w, y = batch["w"], batch["y"]
        ph = {p: self._in_phase(p, batch["progress"]).to(w.dtype) for p in PHASES}
        ema, central = self.cfg.anchors == "ema", self.cfg.anchors == "global"
        anchors = local["anchors"] if ema else self.seeded_anchors
        seen = local["anchor_seen"] if ema else torch.ones_like(local["anchor_seen"])
        if central:  # running class means of the received global extractor's features, this batch included
            onehot = F.one_hot(y, self.num_classes).to(w.dtype) * w.unsqueeze(-1)
            body_g = {k: v for k, v in down["params"].items() if not k.startswith("head.")}
            h_g = self.features(body_g, down.get("buffers") or local["buffers"], batch["x"]).detach()
            anchor_sum = local["anchor_sum"] + onehot.T @ h_g
            seen = local["anchor_seen"] + onehot.sum(0)   # sample counts (weights) per class
            anchors = anchor_sum / seen.clamp_min(1.0).unsqueeze(-1)
            seen = (seen > 0).to(w.dtype)
        tau = self.cfg.kd_temperature
        mu, mu_local = self.cfg.anchor_weight, self.cfg.anchor_weight_local
        body = {k: v for k, v in local["params"].items() if not k.startswith("head.")}
        phi_g = {k: local["params"][k] for k in self.head_keys}
        wsum = w.sum().clamp_min(1.0)

        def loss_fn(theta: Tensors, phi_i: Tensors):
            h, buffers = self.features_and_buffers(theta, local["buffers"], batch["x"])
            # squared distance per feature dimension, so the weight does not scale with the width
            pull = (((h - anchors[y].detach()) ** 2).mean(-1) * seen[y] * w).sum() / wsum
            glf_global = self.weighted_ce(self.classify(phi_g, h), batch) + mu * pull
            glf_local = self.weighted_ce(self.classify(phi_i, h), batch) + mu_local * pull
            hd = h.detach()
            logits_i = self.classify(phi_i, hd)
            teacher = F.softmax(self.classify(phi_g, hd) / tau, -1)
            kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - F.log_softmax(logits_i / tau, -1))).sum(-1)
            gpc = self.weighted_ce(logits_i, batch) + down["kappa"] * tau ** 2 * (kl * w).sum() / wsum
            total = ph["glf_global"] * glf_global + ph["gpc"] * gpc + ph["glf_local"] * glf_local
            return total, (total.detach(), hd, buffers)

        (g_theta, g_phi), (loss, h, buffers) = grad(loss_fn, argnums=(0, 1), has_aux=True)(body, local["phead"])
        new = dict(local, buffers=buffers, steps=local["steps"] + 1)
        # gpc trains phi_i only (its loss sees detached features); glf_local must not move phi_i
        new_body = self.sgd(body, g_theta, local, new, {})
        new["phead"] = sgd_step(local["phead"], g_phi, self.lr * ph["gpc"])
        new["params"] = {**new_body, **phi_g}
        if central:
            new["anchor_sum"], new["anchor_seen"] = anchor_sum, local["anchor_seen"] + onehot.sum(0)
            new["anchors"] = anchors
        if ema:
            beta = self.cfg.anchor_momentum
            onehot = F.one_hot(y, self.num_classes).to(h.dtype) * w.unsqueeze(-1)
            cnt = onehot.sum(0)
            present = (cnt > 0).to(h.dtype)
            mean = (onehot.T @ h) / cnt.clamp_min(1.0).unsqueeze(-1)
            old = local["anchors"]
            blend = torch.where(local["anchor_seen"].unsqueeze(-1) > 0, beta * old + (1 - beta) * mean, mean)
            new["anchors"] = torch.where(present.unsqueeze(-1) > 0, blend, old)
            new["anchor_seen"] = torch.maximum(local["anchor_seen"], present)
        return new, loss

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        # uplink: theta_i and phi_i (phi_i is this client's contribution to phi_g); anchors stay
        params = {**{k: v for k, v in local["params"].items() if not k.startswith("head.")}, **local["phead"]}
        up = {"params": params, "buffers": local["buffers"]}
        keep: dict[str, Any] = {"private": dict(local["phead"]), "anchors": local["anchors"],
                                "anchor_seen": local["anchor_seen"], **self.extractor_state(local)}
        return up, keep

    # ---- server ----------------------------------------------------------------------------
    def aggregation_weights(self, gstate: dict[str, Any], up: dict[str, Any], sizes: torch.Tensor) -> torch.Tensor:
        deltas = torch.cat([(up["params"][k] - gstate["params"][k]).flatten(1)
                            for k in up["params"] if not k.startswith("head.")], 1)
        mean = (sizes / sizes.sum()) @ deltas
        sim = F.cosine_similarity(deltas, mean.unsqueeze(0).expand_as(deltas), dim=1)
        return fair_weights(sizes, sim, self.cfg.sim_temperature, self.cfg.clip_low, self.cfg.clip_high)

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        fair = self.aggregation_weights(gstate, up, ctx.sizes)
        k = len(fair)
        return self.average(gstate, up, fair), {"fedecouple/weight_max": fair.max() * k,
                                                "fedecouple/weight_min": fair.min() * k}

    def personal_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                        y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        return self.personal_params_with(gstate, cstate, x_train, y_train, self.default_extractor)

    def personal_params_with(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                             y_train: torch.Tensor, extractor: str) -> tuple[Tensors, Tensors]:
        """The extractor (`own`: theta_i, or `global`: theta) and the personal classifier phi_i."""
        model = self.with_extractor(gstate, cstate, extractor)
        return {**model["params"], **{k: cstate["private"][k] for k in self.head_keys}}, model["buffers"]
