"""FedSQ (arXiv 2604.02990): FedAvg over the QUANTITATIVE copy of a pretrained network whose gating
regimes are fixed by a frozen STRUCTURAL copy (DualCopy, see models/dualcopy.py).

The structural copy is the warm-start checkpoint itself: never trained, averaged or sent (0 bytes);
it is public. Uplink and downlink are the quantitative copy only, exactly what FedAvg sends.
Reconstructed details (config): which activations are gates, whether max-pools select at the
structural copy's argmax (`max_pool_gating`), and whether the quantitative copy's BatchNorm uses batch
statistics (`bn: batch`) or the pretrained ones (`bn: frozen`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from fedbench.config import spec
from fedbench.engine.protocol import RoundContext, RunContext
from fedbench.errors import ConfigError
from fedbench.methods.local_sgd import LocalSGDConfig, LocalSGDMethod
from fedbench.models.dualcopy import dual_forward, install_gates, make_dual_loss_fn
from fedbench.models.warmstart import calibrate
from fedbench.registry import register

log = logging.getLogger("fedbench")


@dataclasses.dataclass(frozen=True)
class FedSQConfig(LocalSGDConfig):
    # activations whose regime the structural copy fixes
    gates: tuple[str, ...] = spec(("relu", "relu6"), choices=("relu", "relu6"))
    max_pool_gating: bool = False   # true: every MaxPool2d takes the value at the structural copy's argmax
    # quantitative BatchNorm: frozen (pretrained statistics) | batch
    bn: str = spec("frozen", choices=("batch", "frozen"))
    # central calibration: fine-tune k epochs before freezing the structure
    calibration_epochs: int = spec(0, ge=0)
    # ... on a server-held sample of this share of the pooled training data
    calibration_fraction: float = spec(0.05, gt=0, le=1)
    calibration_lr: float = spec(0.01, gt=0)  # (reconstructed; SGD momentum 0.9)
    calibration_batch_size: int = spec(32, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gates:
            raise ConfigError("method.gates=[]: name at least one activation (relu, relu6)")


@register("method", "fedsq")
class FedSQ(LocalSGDMethod):
    name = "fedsq"
    Config = FedSQConfig

    def prepare_model(self, model: torch.nn.Module, ctx: RunContext) -> dict[str, Any]:
        """The optional central calibration, before the structural copy is frozen. It runs again on
        resume (deterministic on CPU), because the structural copy is taken from its result."""
        if self.cfg.calibration_epochs == 0 or ctx.pooled_train is None:
            return {}
        x, y = ctx.pooled_train()
        c = self.cfg
        info = calibrate(model, x, y, epochs=c.calibration_epochs, fraction=c.calibration_fraction,
                         lr=c.calibration_lr, batch_size=c.calibration_batch_size, seed=ctx.seed)
        log.info("central calibration: %d epoch(s) on %d server-held samples", info["calibration.epochs"],
                 info["calibration.samples"])
        return info

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.gates = install_gates(self.model, self.cfg.gates, max_pool=self.cfg.max_pool_gating)
        if not self.gates:
            raise ConfigError(f"method=fedsq: the backbone has no {' / '.join(self.cfg.gates)} activations to gate")
        # the structural copy: the parameters the run starts from (the warm start), frozen
        self.struct = ({k: v.detach().clone() for k, v in ctx.params.items()},
                       {k: v.detach().clone() for k, v in ctx.buffers.items()})
        self.loss_fn = make_dual_loss_fn(self.model, self.gates, *self.struct, self.task)

    def post_aggregate(self, gstate: dict[str, Any], new: dict[str, Any], reduced: dict[str, Any],
                       ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return new, {"fedsq/n_gates": len(self.gates)}

    predicts_with_backbone = False  # its own predict

    def predict(self, gstate: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            return dual_forward(self.model, self.gates, self.struct, (gstate["params"], gstate["buffers"]), x)
        finally:
            self.model.train(was)
