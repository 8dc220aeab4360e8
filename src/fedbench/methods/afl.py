"""AFL (He et al., CVPR 2025): analytic federated learning of one ridge layer on frozen features.

Each client uploads C_k = X_k^T X_k (d x d) and Q_k = X_k^T Y_k (d x C) once; the server solves
W = (sum C_k + ridge I)^-1 sum Q_k. Summing statistics and solving once gives the same model as the
paper's per-client solutions + absolute aggregation, and is invariant to the partition.

`ri: true` (default, the official code's regularisation-invariant aggregation): the clients' ridge is
removed after aggregation, so the server solves the unregularised joint least squares (minimum-norm when
singular); `ri: false` keeps `ridge` in the joint solve.

`payload: stats` (default) uploads the sufficient statistics above (d x d + d x C, in `payload_dtype`);
`payload: official` uploads what the official AFL client sends: its local solution W_k = R_k Q_k, R_k =
(C_k + ridge I)^-1 and R_k^-1, all float64 (8 (d C + 2 d^2) bytes per client), so AFL's communication
can be compared as the paper counts it. The server recovers C_k and Q_k from them: the same model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedbench.config import spec
from fedbench.engine.protocol import RoundContext
from fedbench.errors import ConfigError
from fedbench.methods.analytic import AnalyticConfig, AnalyticMethod, ridge_solve
from fedbench.metrics.comm import Payload
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class AFLConfig(AnalyticConfig):
    ri: bool = True   # regularisation-invariant: the ridge is removed after aggregation (unregularised solve)
    # stats: X^T X and X^T Y in payload_dtype | official: W_k, R_k = (X^T X + ridge I)^-1, R_k^-1 in float64
    payload: str = spec("stats", choices=("stats", "official"))

    def __post_init__(self) -> None:
        if self.payload == "official" and self.ridge == 0:
            raise ConfigError("method.payload=official: the official client inverts X^T X + ridge I; "
                              "set method.ridge > 0")


@register("method", "afl")
class AFL(AnalyticMethod):
    name = "afl"
    Config = AFLConfig
    fusable = True
    run_keys = ("ridge",)  # the server's solve

    def required_rounds(self) -> int:
        return 1

    def init_global(self, params: Any, buffers: Any) -> dict[str, Any]:
        return {"W": torch.zeros(self.in_features, self.num_classes, dtype=self.stats_dtype, device=self.device)}

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        return Payload({})  # nothing to send: the backbone is public and frozen

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        z = torch.zeros((), dtype=self.stats_dtype, device=client_id.device)
        return {"gram": z.new_zeros(self.in_features, self.in_features),
                "rhs": z.new_zeros(self.in_features, self.num_classes), "loss": z}

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        x, y, w = batch["x"], batch["y"], batch["w"]
        xf = x.reshape(x.shape[0], -1).to(self.stats_dtype)
        xw = xf * w.to(self.stats_dtype)[:, None]
        new = {"gram": local["gram"] + xf.T @ xw, "rhs": local["rhs"] + xf.T @ self.one_hot(y, w),
               "loss": local["loss"]}
        return new, local["loss"]

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        if self.cfg.payload == "stats":
            return super().client_final(local, down, cstate)
        c = (local["gram"] + self.cfg.ridge * torch.eye(self.in_features, dtype=self.stats_dtype,
                                                        device=local["gram"].device)).double()
        r = torch.linalg.inv(c)
        return {"W": r @ local["rhs"].double(), "R": r, "C": c}, {}

    def uplink(self, stacked_up: dict[str, Any]) -> Payload:
        if self.cfg.payload == "stats":
            return super().uplink(stacked_up)
        return Payload(stacked_up, stacked=True)  # three dense float64 matrices, as the official client

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.cfg.payload == "official":  # C_k - ridge I = X_k^T X_k and C_k W_k = X_k^T Y_k
            eye = torch.eye(self.in_features, dtype=torch.float64, device=up["C"].device)
            up = {"gram": up["C"] - self.cfg.ridge * eye, "rhs": up["C"] @ up["W"]}
        s = self.aggregate_sums(up)
        return {"W": ridge_solve(s["gram"], s["rhs"], 0.0 if self.cfg.ri else self.cfg.ridge)}, {}

    predicts_with_backbone = False  # its own predict

    def predict(self, gstate: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(self.stats_dtype) @ gstate["W"]

    def model_tensors(self, gstate: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"W": gstate["W"]}
