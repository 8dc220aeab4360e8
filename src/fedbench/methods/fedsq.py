"""FedSQ (arXiv 2604.02990): FedAvg over the QUANTITATIVE copy of a pretrained network whose gating
regimes are fixed by a frozen STRUCTURAL copy (DualCopy, see models/dualcopy.py).

The structural copy is the warm-start checkpoint itself: never trained, averaged or sent (0 bytes);
it is public. Uplink and downlink are the quantitative copy only, exactly what FedAvg sends.
Reconstructed details (config): which activations are gates, whether max-pools select at the
structural copy's argmax (`max_pool_gating`), and whether the quantitative copy's BatchNorm uses batch
statistics (`bn: batch`) or the pretrained ones (`bn: frozen`).
"""

from __future__ import annotations

from typing import Any

import torch

from fedbench.errors import ConfigError
from fedbench.methods.base import LocalSGDMethod, Tensors
from fedbench.models.dualcopy import dual_forward, install_gates, make_dual_loss_fn
from fedbench.registry import register


@register("method", "fedsq")
class FedSQ(LocalSGDMethod):
    name = "fedsq"

    def setup(self, params: Tensors, buffers: Tensors, total_rounds: int) -> None:
        super().setup(params, buffers, total_rounds)
        if int(self.hp.get("calibration_epochs", 0)) < 0:
            raise ConfigError(f"method.calibration_epochs={self.hp.get('calibration_epochs')}: must be >= 0")
        if not 0.0 < float(self.hp.get("calibration_fraction", 0.05)) <= 1.0:
            raise ConfigError(f"method.calibration_fraction={self.hp.get('calibration_fraction')}: must be in (0, 1]")
        kinds = tuple(str(k) for k in self.hp.get("gates", ["relu", "relu6"]))
        bad = set(kinds) - {"relu", "relu6"}
        if bad:
            raise ConfigError(f"method.gates={sorted(bad)}: allowed: relu, relu6")
        self.gates = install_gates(self.model, kinds, max_pool=bool(self.hp.get("max_pool_gating", False)))
        if not self.gates:
            raise ConfigError(f"method=fedsq: the backbone has no {' / '.join(kinds)} activations to gate")
        bn = str(self.hp.get("bn", "frozen"))
        if bn not in ("frozen", "batch"):
            raise ConfigError(f"method.bn={bn}: allowed: frozen, batch")
        if bn == "frozen":
            self.model.eval()  # quantitative BatchNorm keeps the pretrained statistics
        # the structural copy: the parameters the run starts from (the warm start), frozen
        self.struct = ({k: v.detach().clone() for k, v in params.items()},
                       {k: v.detach().clone() for k, v in buffers.items()})
        self.loss_fn = make_dual_loss_fn(self.model, self.gates, *self.struct, self.task)

    def predict(self, gstate: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            return dual_forward(self.model, self.gates, self.struct, (gstate["params"], gstate["buffers"]), x)
        finally:
            self.model.train(was)

    def round_metrics(self, gstate: dict[str, Any], round_: int) -> dict[str, Any]:
        return {"fedsq/n_gates": len(self.gates)}
