"""Early stopping: end a run when its validation metric has not improved for `patience` evaluations.

    fedbench +callbacks=early_stop callbacks.early_stop.patience=3

The run ends as completed, with `stopped_by: early_stop` and the reason in summary.json; its
checkpoint is marked finished, so the same command again trains no further round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedbench.config import GroupConfig, spec
from fedbench.metrics import names
from fedbench.run.callbacks import Callback, callback

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState


@dataclass(frozen=True)
class EarlyStopConfig(GroupConfig):
    metric: str | None = (
        None  # null: the run's validation score (global/val_acc or _r2; personal/val_acc)
    )
    mode: str = spec("max", choices=("max", "min"))  # min for losses
    patience: int = spec(5, ge=1)  # evaluations without improvement before stopping
    min_delta: float = spec(0.0, ge=0)  # an improvement must exceed this


@callback("early_stop", EarlyStopConfig)
class EarlyStop(Callback):
    """Counts evaluations since the metric last improved by more than min_delta; stops at
    patience."""

    stage = "measure"

    def __init__(self, config: EarlyStopConfig | None = None):
        super().__init__(config)
        self.best: float | None = None
        self.best_round: int | None = None
        self.waited = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_round": self.best_round, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_round, self.waited = (
            state["best"],
            state["best_round"],
            state["waited"],
        )

    def on_start(self, run: Run, state: RunState) -> None:
        self.metric = self.cfg.metric or names.selection_metric(
            run.dataset.task, run.method.has_global_model
        )

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        gain = value - self.best if self.cfg.mode == "max" else self.best - value
        return gain > self.cfg.min_delta

    def after_round(
        self, run: Run, state: RunState, row: Mapping[str, Any]
    ) -> tuple[bool | str, dict[str, Any]]:
        value = row.get(self.metric)
        if value is None or not math.isfinite(value):  # not an evaluated round
            return False, {}
        if self.improved(value):
            self.best, self.best_round, self.waited = float(value), state.round, 0
        else:
            self.waited += 1
        metrics = {"early_stop/waited": self.waited}
        if self.waited < self.cfg.patience or state.round >= run.rounds:
            return False, metrics
        return (
            f"early_stop: {self.metric} did not improve by more than {self.cfg.min_delta:g} for "
            f"{self.waited} evaluations (best {self.best:.4f} at round {self.best_round})"
        ), metrics
