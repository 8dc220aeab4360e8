"""The outcome of a sweep: every job leaves a summary.json (completed, failed, diverged, preempted with its
one-line reason), and the launching command ends with a one-screen account and exit != 0 when any job
did not complete. Works for every launcher, SLURM without accounting included: the account reads the
jobs' files, not the scheduler."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedbench.tracking.files import write_json


class SweepAccount(Callback):
    """A Hydra callback (conf/config.yaml, hydra.callbacks): remembers where the sweep writes its jobs and,
    when the jobs run in other processes (joblib, submitit, SLURM), says every minute how many have ended,
    so a launching command never sits silent for the whole sweep."""

    sweep_dir: ClassVar[Path | None] = None
    PROGRESS_EVERY_S: ClassVar[float] = float(os.environ.get("FEDBENCH_PROGRESS_EVERY_S", "60"))
    # class-level, not on the instance: launchers pickle the callbacks with the jobs (no locks there)
    _done: ClassVar[threading.Event] = threading.Event()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepAccount.sweep_dir = Path(str(config.hydra.sweep.dir))
        launcher = str(config.hydra.launcher.get("_target_", ""))
        SweepAccount._done = threading.Event()
        if "BasicLauncher" not in launcher:  # the basic launcher's jobs print their own lines
            threading.Thread(target=self._report, args=(SweepAccount.sweep_dir, time.time(), SweepAccount._done),
                             daemon=True, name="fedbench-sweep-progress").start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepAccount._done.set()

    def _report(self, sweep_dir: Path, started: float, done: threading.Event) -> None:
        last = -1
        while not done.wait(self.PROGRESS_EVERY_S):
            ended = [p for p in sweep_dir.glob("*/summary.json") if p.stat().st_mtime >= started]
            running = [p for p in sweep_dir.glob("*/metrics.jsonl") if not (p.parent / "summary.json").exists()
                       or (p.parent / "summary.json").stat().st_mtime < started]
            if len(ended) != last or running:
                print(f"fedbench sweep: {len(ended)} job(s) ended, {len(running)} running "
                      f"({time.time() - started:.0f} s; logs in {sweep_dir}/N/)", file=sys.stderr, flush=True)
                last = len(ended)


def record_failure(run_dir: Path, status: str, reason: str) -> None:
    """Make sure the job's summary.json says how it ended (a failure before round 1 leaves none)."""
    path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    if path.exists():
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            summary = {}
    if summary.get("status") in (None, "completed", "interrupted"):
        summary["status"] = status
    summary.setdefault("reason", reason)
    summary.setdefault("run_dir", str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, summary)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def account(sweep_dir: Path, n_jobs: int | None = None) -> tuple[str, bool]:
    """(a one-screen account of the sweep, whether every job completed)."""
    dirs = job_dirs(sweep_dir) if sweep_dir.is_dir() else []
    n = max(n_jobs or 0, len(dirs))
    outcome: dict[str, str] = {}
    problems: list[str] = []
    for i in range(n):
        path = sweep_dir / str(i) / "summary.json"
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            s = {"status": "no result", "reason": f"no summary.json in {path.parent} (killed? see its log)"}
        outcome[str(i)] = s.get("status", "unknown")
        if s.get("status") != "completed":
            hint = "; rerun the same command to resume it" if s.get("status") == "preempted" else ""
            problems.append(f"  {s.get('status', 'unknown'):9s} job {i}: {s.get('reason', '')}"[:300] + hint)
    counts: dict[str, int] = {}
    for st in outcome.values():
        counts[st] = counts.get(st, 0) + 1
    head = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: kv[0] != "completed"))
    lines = [f"fedbench sweep: {n} jobs in {sweep_dir}: {head or 'none ran'}", *problems]
    if problems:
        lines.append(f"  logs: {sweep_dir}/N/*.log (SLURM: {sweep_dir}/.submitit/*/*_log.err); "
                     f"fedbench-report {sweep_dir} leaves these jobs out of the means")
    if sweep_dir.is_dir():
        write_json(sweep_dir / "sweep_status.json", {"jobs": n, "counts": counts, "status": outcome})
    return "\n".join(lines), not problems and n > 0
