"""FedRep (Collins et al. 2021): each round a client first trains its private head with the body frozen,
then the body with the head frozen; only the body is sent and averaged.

`method.head_fraction`: the share of the client's local steps spent on the head (FedRep's 10 head
epochs + 1 body epoch is 10/11)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedbench.errors import ConfigError
from fedbench.methods.base import LocalSGDConfig
from fedbench.methods.personal import PersonalizedMethod
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class FedRepConfig(LocalSGDConfig):
    head_fraction: float = 0.5   # share of each client's local steps spent on the head

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.head_fraction <= 1.0:
            raise ConfigError(f"method.head_fraction={self.head_fraction}: must be in [0, 1]")


@register("method", "fedrep")
class FedRep(PersonalizedMethod):
    name = "fedrep"
    Config = FedRepConfig
    shared = "body"
    needs_progress = True

    def grad_mask(self, local: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        head_phase = (batch["progress"] < self.cfg.head_fraction).to(batch["w"].dtype)
        return {k: head_phase if k.startswith("head.") else 1.0 - head_phase for k in local["params"]}
