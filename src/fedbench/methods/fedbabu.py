"""FedBABU (Oh et al. 2022): during FL the classifier stays frozen at its (shared, seeded) initial
values and only the body is trained, sent and averaged; each client fine-tunes the head on its own
training data before it predicts (`method.finetune_steps` full-batch steps at `method.finetune_lr`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedbench.config import spec
from fedbench.engine.functional import grad
from fedbench.engine.optim import sgd_step
from fedbench.methods.base import Tensors
from fedbench.methods.personal import PersonalConfig, PersonalizedMethod
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class FedBABUConfig(PersonalConfig):
    finetune_steps: int = spec(10, ge=0)  # full-batch head steps before a client predicts
    finetune_lr: float = spec(0.05, gt=0)


@register("method", "fedbabu")
class FedBABU(PersonalizedMethod):
    name = "fedbabu"
    Config = FedBABUConfig
    step_size_keys = ("server_lr", "finetune_lr")
    shared = "body"
    two_extractors = True

    def grad_mask(self, local: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {k: 0.0 for k in local["params"] if k.startswith("head.")}

    def personal_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                        y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        params, buffers = super().personal_params(gstate, cstate, x_train, y_train)
        with torch.no_grad():
            h = self.features(params, buffers, x_train)
        w = torch.ones(len(y_train), dtype=h.dtype, device=h.device)
        head = {k: v for k, v in params.items() if k.startswith("head.")}

        def loss(hp: Tensors) -> torch.Tensor:
            return self.weighted_ce(self.classify(hp, h), {"y": y_train, "w": w})

        with torch.enable_grad():
            for _ in range(self.cfg.finetune_steps):
                g = grad(loss)(head)
                head = sgd_step(head, g, self.cfg.finetune_lr)
        return {**params, **head}, buffers

    def new_client_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                          y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        return self.personal_params(gstate, cstate, x_train, y_train)  # its fine-tuning is the rule
