"""FedeCouple (arXiv 2511.09599). The full text was not available: components from the abstract,
formulas reconstructed (every choice below is a key of FedeCoupleConfig).

Server: a global extractor theta (`body.*`) and a global classifier phi_g (`head.*`). Client i keeps a
personal classifier phi_i and class anchors A_i across rounds (stacked [N, ...] client state). One local
round, phases by the share of the client's local steps (`phase_fractions`, in `phase_order`):
  glf_global: train theta with phi_g frozen: CE(g(f(x); phi_g), y) + mu * ||f(x) - a_y||^2   (GLF + GFA)
  gpc:        train phi_i on frozen features: CE(g(h; phi_i), y)
              + kappa_t * tau^2 * KL(softmax(g(h; phi_g)/tau) || softmax(g(h; phi_i)/tau))   (GPC)
  glf_local:  train theta with phi_i frozen: CE(g(f(x); phi_i), y) + mu_local * ||f(x) - a_y||^2
Anchors: `ema` (running class means of the client's own features) or `seeded` (fixed random anchors from
a shared seed: the same on every client, never sent). Anchors never enter a payload.
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
    # ema: running class means of the client's own features | seeded: shared fixed
    anchors: str = spec("ema", choices=("ema", "seeded"))
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

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        params = ctx.params
        self.head_keys = [k for k in params if k.startswith("head.")]
        fractions = [0.0, *self.cfg.phase_fractions]
        edges = torch.cumsum(torch.tensor(fractions, dtype=torch.float64), 0).tolist()
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
        if self.cfg.eval_extractor == "local":
            body = {**{k: v for k, v in p.items() if not k.startswith("head.")}, **gstate["buffers"]}
            state["extractor"] = {k: per_client(v, n_clients) for k, v in body.items()}
            state["x_trained"] = ref.new_zeros(n_clients)  # 0 until the client's first round
        return state

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
        return local

    # ---- local training --------------------------------------------------------------------
    def _in_phase(self, name: str, progress: torch.Tensor) -> torch.Tensor:
        if name not in self.phase_span:
            return torch.zeros_like(progress)
        lo, hi = self.phase_span[name]
        return ((progress >= lo) & (progress < hi)).to(progress.dtype)

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        w, y = batch["w"], batch["y"]
        ph = {p: self._in_phase(p, batch["progress"]).to(w.dtype) for p in PHASES}
        ema = self.cfg.anchors == "ema"
        anchors = local["anchors"] if ema else self.seeded_anchors
        seen = local["anchor_seen"] if ema else torch.ones_like(local["anchor_seen"])
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
                                "anchor_seen": local["anchor_seen"]}
        if self.cfg.eval_extractor == "local":
            keep["extractor"] = {**{k: v for k, v in params.items() if not k.startswith("head.")},
                                 **local["buffers"]}
            keep["x_trained"] = torch.ones_like(cstate["x_trained"])
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
        params = {**gstate["params"], **{k: cstate["private"][k] for k in self.head_keys}}
        buffers = gstate["buffers"]
        if self.cfg.eval_extractor == "local" and bool(cstate["x_trained"] > 0):
            params.update({k: cstate["extractor"][k] for k in params if not k.startswith("head.")})
            buffers = {k: cstate["extractor"][k] for k in buffers}
        return params, buffers
