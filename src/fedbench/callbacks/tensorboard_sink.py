"""A TensorBoard sink: every numeric metric of every round as a scalar, in `RUN_DIR/tensorboard/`.

    fedbench logger=tensorboard              # or: logger.sinks=[wandb,tensorboard]
    tensorboard --logdir outputs/            # then compare runs side by side

Needs the `tensorboard` package (`pip install -e '.[tensorboard]'`). A resumed run purges the steps
past its checkpoint, so the curves have every round once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedbench.errors import ConfigError
from fedbench.run.callbacks import Callback, RunEnd, callback

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState


@callback("tensorboard")
class TensorBoardSink(Callback):
    stage = "sink"

    def on_start(self, run: Run, state: RunState) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "logger.sinks: tensorboard needs the tensorboard package: "
                "pip install -e '.[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(
            log_dir=str(run.run_dir / "tensorboard"),
            purge_step=state.round + 1 if state.round > 0 else None,
        )

    def after_round(
        self, run: Run, state: RunState, row: Mapping[str, Any]
    ) -> tuple[bool, dict[str, Any]]:
        for key, value in row.items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self.writer.add_scalar(key, value, global_step=state.round)
        self.writer.flush()
        return False, {}

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any], end: RunEnd) -> None:
        self.writer.close()
