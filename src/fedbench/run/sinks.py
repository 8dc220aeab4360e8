"""The built-in sinks: metrics.jsonl + summary.json (every run), W&B (`logger=wandb`), a progress bar on
a terminal and a plain log line per round otherwise (SLURM logs, nohup, pipes)."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedbench.config import GroupConfig
from fedbench.metrics import names
from fedbench.run.callbacks import Callback, RunEnd, callback
from fedbench.settings import WandbConfig
from fedbench.tracking.files import MetricsFile, write_json
from fedbench.tracking.wandb_logger import WandbLogger

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState

log = logging.getLogger("fedbench")


@callback("files")
class FilesCallback(Callback):
    """metrics.jsonl (one row per round; on resume the rows past the checkpoint are dropped) and
    summary.json at the end."""

    stage = "sink"

    def on_start(self, run: Run, state: RunState) -> None:
        self.file = MetricsFile(run.run_dir / "metrics.jsonl")
        if state.round > 0:
            self.file.truncate_after(state.round)
        elif self.file.path.exists():
            self.file.path.unlink()

    def after_round(self, run: Run, state: RunState, row: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
        self.file.append(dict(row))
        return False, {}

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any], end: RunEnd) -> None:
        write_json(run.run_dir / "summary.json", summary)


@callback("wandb", WandbConfig)
class WandbCallback(Callback):
    """One W&B run per fedbench run (resumed under the same id, kept in the checkpoint); offline by
    default. Settings: `logger.wandb.*`."""

    stage = "sink"

    def __init__(self, config: WandbConfig | None = None):
        super().__init__(config)
        self.run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")

    def on_start(self, run: Run, state: RunState) -> None:
        cfg, wb = run.cfg, self.cfg
        default_tags = [str(cfg.method.name), str(cfg.partition.name), str(cfg.dataset.name)]
        self.wandb = WandbLogger(wb.mode, run.run_dir, wb.project, run.wandb_config(), entity=wb.entity,
                                 group=wb.group or run.sweep_group, tags=list(wb.tags) or default_tags,
                                 job_type=wb.job_type or str(cfg.method.name), run_id=self.run_id)
        self.run_id = self.wandb.run_id
        if state.round > 0:  # resumed: the W&B run may miss rows a killed process never flushed
            rows = MetricsFile(run.run_dir / "metrics.jsonl").read()
            logged = self.wandb.backfill([r for r in rows if r.get("round", 0) <= state.round])
            if logged:
                log.info("W&B: re-logged %d round(s) from metrics.jsonl up to the checkpoint's round %d",
                         logged, state.round)

    def after_round(self, run: Run, state: RunState, row: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
        self.wandb.log(dict(row), step=state.round)
        return False, {}

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any], end: RunEnd) -> None:
        self.wandb.summary(summary)
        self.wandb.finish(exit_code=0 if summary["status"] == "completed" else 1)


def _headline(row: Mapping[str, Any]) -> dict[str, str]:
    """The numbers a person watches: validation metric and best so far, or personal accuracy."""
    for task in names.TASKS:
        key, best = names.global_val(task), names.best_val(task)
        if key in row:
            return {key.split("/")[1]: f"{row[key]:.4f}", "best": f"{row[best]:.4f}@{row[names.BEST_ROUND]}"}
    if names.PERSONAL_TEST_ACC in row:
        return {"personal_test_acc": f"{row[names.PERSONAL_TEST_ACC]:.4f}"}
    return {}


@dataclass(frozen=True)
class ProgressConfig(GroupConfig):
    enabled: bool = True   # set from the run's `progress`


@callback("progress", ProgressConfig)
class ProgressCallback(Callback):
    """A tqdm bar over rounds on a terminal; without one, a plain log line per evaluated round."""

    stage = "sink"

    def __init__(self, config: ProgressConfig | None = None):
        super().__init__(config)
        self.enabled = self.cfg.enabled

    def on_start(self, run: Run, state: RunState) -> None:
        from tqdm import tqdm

        # a terminal that reports no size (some containers, `ssh host cmd`) would draw an empty bar
        self.tty = sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns > 0
        self.bar = tqdm(total=run.rounds, initial=state.round, desc="rounds", file=sys.stderr, dynamic_ncols=True,
                        disable=not (self.enabled and self.tty))
        if state.round > 0:
            log.info("resumed from round %d of %d (%s)", state.round, run.rounds, run.ckpt_path)

    def after_round(self, run: Run, state: RunState, row: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
        head = _headline(row)
        self.bar.update(1)
        if head:
            self.bar.set_postfix(head)
        if self.enabled and not self.tty and head:
            eta = state.totals["time_s"] / max(state.round, 1) * (run.rounds - state.round)
            log.info("round %d/%d %s elapsed %.1fs eta %.0fs", state.round, run.rounds,
                     " ".join(f"{k} {v}" for k, v in head.items()), state.totals["time_s"], eta)
        return False, {}

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any], end: RunEnd) -> None:
        self.bar.close()
