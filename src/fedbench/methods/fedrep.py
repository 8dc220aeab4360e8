"""FedRep (Collins et al. 2021): each round a client first trains its private head with the body frozen,
then the body with the head frozen; only the body is sent and averaged.

`method.head_fraction`: the share of the client's local steps spent on the head (FedRep's 10 head
epochs + 1 body epoch is 10/11)."""

from typing import Any

import torch

from fedbench.methods.personal import PersonalizedMethod
from fedbench.registry import register


@register("method", "fedrep")
class FedRep(PersonalizedMethod):
    name = "fedrep"
    shared = "body"
    needs_progress = True

    def grad_mask(self, local: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        head_phase = (batch["progress"] < float(self.hp.get("head_fraction", 0.5))).to(batch["w"].dtype)
        return {k: head_phase if k.startswith("head.") else 1.0 - head_phase for k in local["params"]}
