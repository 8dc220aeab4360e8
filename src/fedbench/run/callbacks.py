"""The callback protocol, and the callbacks that guard a run: divergence, checkpoint and preemption.

    on_start(run, state)               before the first round (fresh or resumed)
    after_round(run, state, row) -> stop?   after every round; may add metrics to `row`; True stops the loop
    on_end(run, state, summary)        always, also after an error (the summary says the status)

Callbacks run in list order, so evaluation comes before the sinks that write its metrics. Adding
TensorBoard or early stopping is one new callback.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedbench.engine.distributed import SINGLE, World
from fedbench.errors import DivergedError, Preempted
from fedbench.run.state import save_checkpoint

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState


class Callback:
    def on_start(self, run: Run, state: RunState) -> None:
        return None

    def after_round(self, run: Run, state: RunState, row: dict[str, Any]) -> bool:
        return False

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any]) -> None:
        return None


class StopFlag:
    """Set (e.g. by a signal handler) to stop at the end of the current round with a checkpoint."""

    requested = False


class DivergenceCallback(Callback):
    """A non-finite training loss stops the run (after the sinks kept the round's metrics)."""

    def after_round(self, run: Run, state: RunState, row: dict[str, Any]) -> bool:
        loss = row.get("train/loss", 0.0)
        if not math.isfinite(loss):
            raise DivergedError(f"round {state.round}: training loss is {loss}; {divergence_hint(run)}. "
                                f"Metrics up to round {state.round} are in {run.run_dir / 'metrics.jsonl'}")
        return False


def divergence_hint(run: Run) -> str:
    """The likely cause of a non-finite loss: the step sizes in play (lowest-hanging first), the dtype."""
    method_cfg = run.method.cfg
    steps = [f"lr={run.cfg.lr:g}"] + [f"method.{k}={getattr(method_cfg, k):g}" for k in run.method.step_size_keys
                                      if isinstance(getattr(method_cfg, k, None), (int, float))]
    hint = f"the steps are too large for this model and data: lower lr first (step sizes: {', '.join(steps)})"
    if str(run.cfg.hardware.dtype) == "bfloat16":
        hint += "; or use hardware.dtype=float32 (bfloat16 has 8 bits of mantissa)"
    if float(run.cfg.lr) < 1e-3:
        hint += "; with so small a lr, also check the inputs for non-finite values"
    return hint


class CheckpointCallback(Callback):
    """checkpoint.pt every `checkpoint_every` rounds and at the end; on a stop request (SIGTERM) or
    `stop_after` it writes one and raises Preempted, so the same command resumes exactly."""

    def __init__(self, every: int, stop_after: int | None = None, world: World = SINGLE):
        self.every, self.stop_after, self.world = every, stop_after, world

    def save(self, run: Run, state: RunState, finished: bool) -> None:
        if self.world.is_main:  # one writer; every rank decides the same way
            save_checkpoint(run.ckpt_path, state.to_checkpoint(run.fingerprint, finished=finished))

    def after_round(self, run: Run, state: RunState, row: dict[str, Any]) -> bool:
        r, last = state.round, run.rounds
        stop = self.world.any(StopFlag.requested)  # a signal seen by any rank stops all at this round
        if r == last:
            self.save(run, state, finished=True)
        elif stop or (self.stop_after is not None and r >= self.stop_after):
            self.save(run, state, finished=False)
            raise Preempted(f"stopped after round {r}; checkpoint in {run.ckpt_path}")
        elif r % self.every == 0:
            self.save(run, state, finished=False)
        return False
