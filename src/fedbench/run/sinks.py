"""Metric sinks as callbacks: metrics.jsonl + summary.json, W&B, a progress bar on a terminal and a plain
log line per round otherwise (SLURM logs, nohup, pipes)."""

from __future__ import annotations

import logging
import shutil
import sys
from typing import TYPE_CHECKING, Any

from fedbench.run.callbacks import Callback
from fedbench.tracking.files import MetricsFile, write_json
from fedbench.tracking.wandb_logger import WandbLogger

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState

log = logging.getLogger("fedbench")


class FilesCallback(Callback):
    """metrics.jsonl (one row per round; on resume the rows past the checkpoint are dropped) and
    summary.json at the end."""

    def on_start(self, run: Run, state: RunState) -> None:
        self.file = MetricsFile(run.run_dir / "metrics.jsonl")
        if state.round > 0:
            self.file.truncate_after(state.round)
        elif self.file.path.exists():
            self.file.path.unlink()

    def after_round(self, run: Run, state: RunState, row: dict[str, Any]) -> bool:
        self.file.append(row)
        return False

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any]) -> None:
        write_json(run.run_dir / "summary.json", summary)


class WandbCallback(Callback):
    """One W&B run per fedbench run (resumed under the same id); offline by default."""

    def on_start(self, run: Run, state: RunState) -> None:
        cfg, wb = run.cfg, run.cfg.logger.wandb
        default_tags = [str(cfg.method.name), str(cfg.partition.name), str(cfg.dataset.name)]
        self.wandb = WandbLogger(str(wb.mode), run.run_dir, str(wb.project), run.wandb_config(), entity=wb.entity,
                                 group=wb.group or run.sweep_group, tags=list(wb.tags) or default_tags,
                                 job_type=wb.job_type or str(cfg.method.name), run_id=state.wandb_id)
        state.wandb_id = self.wandb.run_id
        if state.round > 0:  # resumed: the W&B run may miss rows a killed process never flushed
            rows = MetricsFile(run.run_dir / "metrics.jsonl").read()
            logged = self.wandb.backfill([r for r in rows if r.get("round", 0) <= state.round])
            if logged:
                log.info("W&B: re-logged %d round(s) from metrics.jsonl up to the checkpoint's round %d",
                         logged, state.round)

    def after_round(self, run: Run, state: RunState, row: dict[str, Any]) -> bool:
        self.wandb.log(row, step=state.round)
        return False

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any]) -> None:
        self.wandb.summary(summary)
        self.wandb.finish(exit_code=0 if summary["status"] == "completed" else 1)


def _headline(row: dict[str, Any]) -> dict[str, str]:
    """The numbers a person watches: validation metric and best so far, or personal accuracy."""
    for key in ("global/val_acc", "global/val_r2"):
        if key in row:
            return {key.split("/")[1]: f"{row[key]:.4f}", "best": f"{row['best/val_acc']:.4f}@{row['best/round']}"}
    if "personal/test_acc" in row:
        return {"personal_test_acc": f"{row['personal/test_acc']:.4f}"}
    return {}


class ProgressCallback(Callback):
    """A tqdm bar over rounds on a terminal; without one, a plain log line per evaluated round."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def on_start(self, run: Run, state: RunState) -> None:
        from tqdm import tqdm

        # a terminal that reports no size (some containers, `ssh host cmd`) would draw an empty bar
        self.tty = sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns > 0
        self.bar = tqdm(total=run.rounds, initial=state.round, desc="rounds", file=sys.stderr, dynamic_ncols=True,
                        disable=not (self.enabled and self.tty))
        if state.round > 0:
            log.info("resumed from round %d of %d (%s)", state.round, run.rounds, run.ckpt_path)

    def after_round(self, run: Run, state: RunState, row: dict[str, Any]) -> bool:
        head = _headline(row)
        self.bar.update(1)
        if head:
            self.bar.set_postfix(head)
        if self.enabled and not self.tty and head:
            eta = state.totals["time_s"] / max(state.round, 1) * (run.rounds - state.round)
            log.info("round %d/%d %s elapsed %.1fs eta %.0fs", state.round, run.rounds,
                     " ".join(f"{k} {v}" for k, v in head.items()), state.totals["time_s"], eta)
        return False

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any]) -> None:
        self.bar.close()
