"""Who took part: per round (clients/available, sampled, dropped, stragglers: logged when the federation
is not the idealised one), per client over the run (participation.json in the run dir, counts in the
summary and so in W&B, a histogram of rounds sampled). The record is rebuilt from the federation's
seeded plans, so a resumed run writes what an unbroken one writes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbench.data.federation import departure
from fedbench.metrics import names
from fedbench.run.callbacks import Callback, RunEnd, callback
from fedbench.tracking.files import write_json

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState

log = logging.getLogger("fedbench")


def idealised(run: Run) -> bool:
    """Everyone available, nobody held out, nobody drops or straggles (fedbench's original rounds)."""
    return departure(run.cfg) is None and len(run.federation.holdout) == 0  # (a partition file's too)


@callback("participation")
class ParticipationCallback(Callback):
    stage = "measure"

    def after_round(self, run: Run, state: RunState, row: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
        if idealised(run):
            return False, {}
        plan = run.federation.plan(state.round)
        return False, {names.AVAILABLE: int(plan.available.sum()), names.SAMPLED: len(plan.sampled),
                       names.DROPPED: len(plan.dropped), names.STRAGGLERS: len(plan.stragglers)}

    def summary(self, run: Run, state: RunState) -> dict[str, Any]:
        record = run.federation.record(state.round)
        trainable = run.federation.trainable
        sampled = np.asarray(record["sampled"])[trainable]
        return {names.PARTICIPATION_SAMPLED_MEAN: float(sampled.mean()),
                names.PARTICIPATION_SAMPLED_MIN: int(sampled.min()),
                names.PARTICIPATION_NEVER_SAMPLED: int((sampled == 0).sum()),
                names.PARTICIPATION_DROPPED: int(np.sum(record["dropped"])),
                names.PARTICIPATION_STRAGGLED: int(np.sum(record["straggled"]))}

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any], end: RunEnd) -> None:
        if not run.world.is_main:
            return
        f = run.federation
        record = f.record(state.round)
        write_json(run.run_dir / "participation.json", {
            "rounds": state.round, "availability": str(run.cfg.availability.name),
            "expected_availability": f.availability.expected().tolist(), "holdout": f.holdout.tolist(),
            "cohort_size": f.cohort_size, **record}, indent=None)
        if not idealised(run):
            histogram(np.asarray(record["sampled"])[f.trainable], run.run_dir / "participation.png",
                      f"rounds each client was sampled ({run.cfg.availability.name} availability)")


def histogram(counts: np.ndarray, path: Any, title: str) -> None:
    """A bar per number of rounds: how many clients were sampled that often."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values, freq = np.unique(counts, return_counts=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(values, freq, width=0.8)
        ax.set_xlabel("rounds sampled")
        ax.set_ylabel("clients")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # noqa: BLE001 - a plot must never stop a run
        log.warning("participation histogram not written: %s", e)
