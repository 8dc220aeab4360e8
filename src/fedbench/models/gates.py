"""Hard-concrete gates (Louizos et al. 2018) for an L0 constraint, as pure tensor functions.

theta = theta_tilde * z with z in [0, 1]; log_alpha is the gate parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GAMMA, ZETA, BETA, EPS = -0.1, 1.1, 2.0 / 3.0, 1e-6
# shift of the L0 surrogate: P(z != 0) = sigmoid(log_alpha - BETA * log(-GAMMA / ZETA))
L0_SHIFT = BETA * math.log(-GAMMA / ZETA)
# log_alpha below this gives a deterministic gate of exactly 0, above OPEN exactly 1
_Q = -GAMMA / (ZETA - GAMMA)           # sigmoid(log_alpha) at which the stretched gate reaches 0
CLOSED = math.log(_Q / (1.0 - _Q))      # about -2.398
OPEN = -CLOSED


def sample_gate(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Reparameterised sample: gradients flow to log_alpha through z (never detached)."""
    u = u.clamp(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(log_alpha - L0_SHIFT)


DETERMINISTIC_RULES = ("louizos", "gallego_posada")


def deterministic_gate(log_alpha: torch.Tensor, rule: str = "louizos") -> torch.Tensor:
    """The test-time gate: `louizos` (Louizos et al. 2018: sigmoid(log_alpha) stretched to (gamma, zeta),
    clipped) | `gallego_posada` (Gallego-Posada et al. 2022: sigmoid(log_alpha / beta) stretched, clipped)."""
    scale = BETA if rule == "gallego_posada" else 1.0
    return (torch.sigmoid(log_alpha / scale) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def closed_below(rule: str = "louizos") -> float:
    """log_alpha below which the deterministic gate of `rule` is exactly 0."""
    return CLOSED * (BETA if rule == "gallego_posada" else 1.0)


def init_log_alpha(n: int, rho_init: float, std: float, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    mean = math.log(rho_init / (1.0 - rho_init))
    return mean + std * torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)


@dataclass
class GateLayout:
    """Which parameters are gated, and where each sits in one flat gate vector."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]

    @classmethod
    def build(cls, params: dict[str, torch.Tensor], names: list[str]) -> GateLayout:
        shapes = [tuple(params[n].shape) for n in names]
        sizes = [math.prod(s) for s in shapes]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        return cls(names, shapes, offsets)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """flat [..., D] -> {name: [..., *shape]} (views)."""
        lead = flat.shape[:-1]
        return {n: flat[..., a:b].reshape(*lead, *s)
                for n, s, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:], strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])
