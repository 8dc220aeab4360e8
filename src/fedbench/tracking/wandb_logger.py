"""W&B sink. Offline by default (no key, no network). A W&B failure never kills a run: it falls back
to offline once, and if that fails too, to no W&B at all, and says so once."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from fedbench.tracking.wandb_file import wait_complete

log = logging.getLogger("fedbench")

MODES = ("offline", "online", "disabled")


def drop_inherited_service() -> None:
    """Use this process's own W&B service. wandb exports its service's address (WANDB_SERVICE, whose second
    field is the pid that started it) to the environment, so child processes (a sweep's jobs, a run
    resumed by a process that used W&B before) would attach to their parent's service: one that may still
    hold a killed run with the same id open, or, under SLURM, one on another machine."""
    parts = os.environ.get("WANDB_SERVICE", "").split("-")
    if len(parts) > 2 and parts[1].isdigit() and int(parts[1]) != os.getpid():
        os.environ.pop("WANDB_SERVICE", None)


class WandbLogger:
    def __init__(self, mode: str, run_dir: Path, project: str, config: dict[str, Any],
                 entity: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 job_type: str | None = None, name: str | None = None, run_id: str | None = None):
        self.run = None
        self.mode = mode
        if mode == "disabled":
            return
        kwargs = dict(dir=str(run_dir), project=project, entity=entity, group=group, tags=tags or None,
                      job_type=job_type, name=name, config=config, id=run_id, resume="allow" if run_id else None,
                      reinit="create_new")  # a fused sweep logs several runs from one process at once
        try:
            self.run = self._init(mode, kwargs)
        except Exception as e:  # noqa: BLE001 - any W&B failure must not kill the run
            if mode == "offline":  # e.g. the service of a killed run with this id still closing: once more
                log.warning("W&B offline start failed (%s); trying once more in 5 s",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                time.sleep(5)
                try:
                    self.run = self._init(mode, kwargs)
                    return
                except Exception as e2:  # noqa: BLE001
                    e = e2
            if mode == "online":
                log.warning("W&B online failed (%s); logging offline instead (sync later with `wandb sync`)",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                try:
                    self.mode = "offline"
                    self.run = self._init("offline", kwargs)
                    return
                except Exception as e2:  # noqa: BLE001
                    e = e2
            log.warning("W&B disabled for this run: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.mode = "disabled"
            self.run = None

    @staticmethod
    def _init(mode: str, kwargs: dict[str, Any]):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        drop_inherited_service()
        # online without a network: give up after 10 s and fall back to offline (said once)
        settings = wandb.Settings(init_timeout=10 if mode == "online" else 60, console="off", x_disable_stats=True)
        return wandb.init(mode=mode, settings=settings, **kwargs)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in row.items() if v is not None}, step=step)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B log failed (%s); continuing without W&B", e)
            self.run = None

    def backfill(self, rows: list[dict[str, Any]]) -> int:
        """After a resume: log the rows the W&B run does not hold yet, so its history has every round once.

        A killed process (SIGKILL, a SLURM cancel) leaves the W&B run with only the rows flushed before the
        kill, while metrics.jsonl has every finished round. Online, the server's run resumes at its own
        `starting_step` and the rows from there on are logged. Offline, the resumed run gets a new
        offline-run dir: every row is logged into it and the older dirs of the same run id (a prefix of
        the same history) are removed, so one offline run dir holds the whole run (`wandb sync` it).
        Returns how many rows were logged."""
        if self.run is None:
            return 0
        first = int(self.run.starting_step or 0) if self.mode == "online" else 0
        rows = [r for r in rows if int(r.get("round", 0)) >= max(first, 1)]
        for row in rows:
            self.log(row, step=int(row["round"]))
        if self.mode == "offline":
            self._drop_older_offline_dirs()
        return len(rows)

    def _drop_older_offline_dirs(self) -> None:
        import shutil

        try:
            current = Path(self.run.settings.sync_dir).resolve()
        except Exception:  # noqa: BLE001 - without its own dir nothing can be told apart: keep all
            return
        for old in current.parent.glob(f"offline-run-*-{self.run.id}"):
            if old.resolve() != current:
                shutil.rmtree(old, ignore_errors=True)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in values.items() if v is not None})
        except Exception as e:  # noqa: BLE001
            log.warning("W&B summary failed (%s)", e)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run_file = None
        try:
            run_file = self.run.settings.sync_file if self.mode == "offline" else None
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B finish failed (%s)", e)
        self.run = None
        # the service may still hold the file's last block; wait so the run dir is complete when we return
        if run_file and not wait_complete(run_file):
            log.warning("W&B run file %s is not complete yet; `wandb sync` it once the service has flushed",
                        run_file)
