"""Shared pieces of the gradient-free analytic methods (AFL, DeepAFL).

Clients upload SUMS of sample statistics; every minibatch adds to them with its sample weights, so one
local epoch counts every sample exactly once whatever the batch size. The server sums the uploads and
solves least-squares problems in `stats_dtype` (torch.linalg.solve / eigh, never an explicit inverse).
Everything sent travels in `payload_dtype`: float32 by default, as the official code's tensors (half the
bytes of float64); a float64 payload keeps the exact partition invariance.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fedbench.config import MethodConfig, spec
from fedbench.errors import ConfigError
from fedbench.methods.base import Method, RunSpec
from fedbench.metrics.comm import DENSE, SYMMETRIC, Payload

STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class AnalyticConfig(MethodConfig):
    ridge: float = spec(1.0, ge=0)  # gamma in W = (sum C_k + gamma I)^-1 sum Q_k
    # dtype clients accumulate statistics in and the server solves in
    stats_dtype: str = spec("float64", choices=tuple(STATS_DTYPES))
    # dtype of every tensor sent (float32 as the official code; float64: exact)
    payload_dtype: str = spec("float32", choices=tuple(STATS_DTYPES))
    upper_triangle: bool = False   # count only the upper triangle of symmetric uploads

    def __post_init__(self) -> None:  # subclasses call it for their cross-key checks
        return None


class AnalyticMethod(Method):
    """Single-pass statistics: every client every round, one local epoch, no learning rate."""

    Config = AnalyticConfig
    reports_train_loss = False
    uses_backbone = False
    prefers_sequential = True  # one pass of big matmuls per client: nothing to gain from vmap on a CPU

    def __init__(self, config: AnalyticConfig | None = None):
        super().__init__(config)
        self.stats_dtype = STATS_DTYPES[self.cfg.stats_dtype]
        self.payload_dtype = STATS_DTYPES[self.cfg.payload_dtype]
        self.sym_encoding = SYMMETRIC if self.cfg.upper_triangle else DENSE

    def required_rounds(self) -> int:
        raise NotImplementedError

    def check_run(self, run: RunSpec) -> None:
        rounds, participation, local_epochs, local_steps = (run.rounds, run.participation, run.local_epochs,
                                                             run.local_steps)
        need = self.required_rounds()
        if rounds != need:
            raise ConfigError(f"rounds={rounds}: method={self.name} runs exactly {need} communication rounds "
                              f"here; set rounds={need}")
        if participation != 1.0:
            raise ConfigError(f"participation={participation}: method={self.name} needs every client every "
                              f"round; set participation=1.0")
        if run.federation is not None:
            raise ConfigError(f"{run.federation}: method={self.name} needs every client's statistics every "
                              f"round (availability=always, no held-out clients, dropouts or stragglers)")
        if local_epochs != 1 or local_steps is not None:
            raise ConfigError(f"method={self.name} makes one pass over each client's data; set local_epochs=1 "
                              f"and local_steps=null")

    def one_hot(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Weighted one-hot targets: padding samples (w = 0) contribute nothing."""
        return F.one_hot(y, self.num_classes).to(self.stats_dtype) * w.to(self.stats_dtype)[:, None]

    def uplink(self, stacked_up: dict[str, Any]) -> Payload:
        enc = {k: self.sym_encoding for k in stacked_up if k in ("gram", "gram_f")}
        return Payload(stacked_up, encodings=enc, stacked=True)

    def on_wire(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor as it travels (payload dtype)."""
        return t.to(self.payload_dtype)

    def as_sent(self, t: torch.Tensor) -> torch.Tensor:
        """What the receiver of `t` holds: rounded through the payload dtype, computed on in stats dtype."""
        return t.to(self.payload_dtype).to(self.stats_dtype)

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        return {k: self.on_wire(v) for k, v in local.items() if k != "loss"}, {}

    def aggregate_sums(self, up: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.stats_dtype).sum(0) for k, v in up.items()}


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||Y - X W||^2 + ridge ||W||^2 from gram = X^T X and rhs = X^T Y."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    a = gram + ridge * eye
    if ridge <= 0:
        # no ridge: the system may be singular; least squares gives the minimum-norm solution
        sol = torch.linalg.lstsq(a, rhs, driver="gelsd" if a.device.type == "cpu" else None).solution
    else:
        sol = torch.linalg.solve(a, rhs)
    if not torch.isfinite(sol).all():
        raise ConfigError("the least-squares solve produced non-finite values; raise the ridge "
                                 "(method.ridge) or use float64 statistics")
    return sol


def sandwich_solve(gram_f: torch.Tensor, m: torch.Tensor, w: torch.Tensor, gamma: float) -> torch.Tensor:
    """Omega = argmin ||R - F Omega W||^2 + gamma ||Omega||^2 given G = F^T F, M = W R^T F (h x f), W (h x C).

    Normal equation G Omega (W W^T) + gamma Omega = M^T. With W W^T = U diag(s_W) U^T and
    G = V diag(s_F) V^T: Delta = U [(U^T M V) / (gamma + s_W s_F^T)] V^T and Omega = Delta^T.
    """
    s_w, u = torch.linalg.eigh(w @ w.T)
    s_f, v = torch.linalg.eigh(gram_f)
    denom = gamma + s_w[:, None] * s_f[None, :]
    if gamma <= 0 and bool((denom.abs() < 1e-12).any()):
        raise ConfigError("the residual solve is singular (method.residual_ridge=0); use a ridge > 0")
    delta = u @ ((u.T @ m @ v) / denom) @ v.T
    return delta.T
