"""FedRep (Collins et al. 2021): each round a client first trains its private head with the body frozen,
then the body with the head frozen; only the body is sent and averaged.

Local training as in the paper: `head_epochs` (10) passes over the client's data for the head, then
`body_epochs` (1) for the body; the run's `local_epochs` does not apply. `head_fraction` (set it to use
it) is fedbench's earlier rule: the run's local steps split by that share."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedbench.config import spec
from fedbench.errors import ConfigError
from fedbench.methods.personal import PersonalConfig, PersonalizedMethod
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class FedRepConfig(PersonalConfig):
    head_epochs: int = spec(10, ge=0)  # local epochs of the head per round (paper: 10)
    body_epochs: int = spec(1, ge=0)  # then local epochs of the body (paper: 1)
    # set: the run's local_epochs/local_steps, this share on the head
    head_fraction: float | None = spec(None, ge=0, le=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_epochs < 0 or self.body_epochs < 0 or self.head_epochs + self.body_epochs < 1:
            raise ConfigError(f"method.head_epochs={self.head_epochs}, method.body_epochs={self.body_epochs}: "
                              f"must be >= 0 with at least one epoch in all")


@register("method", "fedrep")
class FedRep(PersonalizedMethod):
    name = "fedrep"
    Config = FedRepConfig
    fusable = True
    run_keys = ("server_lr",)
    shared = "body"
    two_extractors = True
    needs_progress = True

    def local_epochs(self, configured: int) -> int:
        if self.cfg.head_fraction is not None:
            return configured
        return self.cfg.head_epochs + self.cfg.body_epochs

    def grad_mask(self, local: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.cfg.head_fraction is not None:
            head_phase = (batch["progress"] < self.cfg.head_fraction).to(batch["w"].dtype)
        else:  # the first head_epochs of the head_epochs + body_epochs passes (robust to rounding at the edge)
            epochs = self.cfg.head_epochs + self.cfg.body_epochs
            head_phase = (batch["progress"] * epochs < self.cfg.head_epochs - 1e-6).to(batch["w"].dtype)
        return {k: head_phase if k.startswith("head.") else 1.0 - head_phase for k in local["params"]}
