"""One experiment: `run_experiment(cfg, run_dir)` = build a Run from the config, then run its rounds
with the standard callbacks. Knows nothing of Hydra beyond receiving a DictConfig."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedbench.engine.distributed import SINGLE, World, broadcast
from fedbench.errors import ConfigError, DivergedError, Preempted, RunDirTaken
from fedbench.run.build import build_run, run_device
from fedbench.run.callbacks import Callback, StopFlag, build_callbacks, follower_callbacks
from fedbench.run.evaluation import evaluate_personal
from fedbench.run.lock import run_dir_lock
from fedbench.run.loop import run_rounds
from fedbench.run.state import find_resumable, fingerprint, load_checkpoint, previous_path
from fedbench.run.summary import format_summary
from fedbench.run.validation import validate
from fedbench.run.workers import finish_workers, start_workers

__all__ = ["ConfigError", "DivergedError", "Preempted", "StopFlag", "evaluate_personal", "format_summary",
           "run_experiment", "validate"]

log = logging.getLogger("fedbench")


def resolve_resume(cfg: DictConfig, run_dir: Path,
                   world: World = SINGLE) -> tuple[Path, dict[str, Any] | None, dict[str, Any] | None]:
    """(run dir, checkpoint to continue from or None, summary of an already finished run or None)."""
    fp = fingerprint(cfg)
    ckpt_path = run_dir / "checkpoint.pt"
    if cfg.resume is True and not ckpt_path.exists():
        found = find_resumable(Path(str(cfg.output_root)), fp, run_dir)
        if found is not None:
            log.info("resume=true: continuing the unfinished run in %s", found)
            (run_dir / "RESUMED_IN.txt").write_text(f"{found}\n")
            run_dir, ckpt_path = found, found / "checkpoint.pt"
    if cfg.resume not in (True, "auto") or not (ckpt_path.exists() or previous_path(ckpt_path).exists()):
        return run_dir, None, None
    checkpoint = load_checkpoint(ckpt_path, run_device(cfg, world))
    if checkpoint["fingerprint"] != fp:
        raise RunDirTaken(f"resume: {ckpt_path} was written by a different config; use another run dir "
                          f"(resume=false starts over in this one)")
    if checkpoint.get("finished") and (run_dir / "summary.json").exists():
        # the same command again (e.g. a sweep restarted after one job failed): keep the result
        log.info("the run in %s already finished; keeping its summary (resume=false runs it again)", run_dir)
        return run_dir, None, json.loads((run_dir / "summary.json").read_text())
    return run_dir, checkpoint, None


def run_experiment(cfg: DictConfig, run_dir: str | Path, sweep_group: str | None = None,
                   stop_after: int | None = None, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Run (or continue) one experiment in `run_dir`; returns the summary.

    `stop_after=k` stops after round k as a preemption would (checkpoint, then `Preempted`);
    `callbacks` replaces the list the config asks for (fedbench.run.callbacks.build_callbacks).
    With several workers (hardware.workers, torchrun, SLURM tasks) rank 0 returns the summary, the
    other ranks an empty dict."""
    started = time.perf_counter()
    validate(cfg)
    world, children = start_workers(cfg, Path(run_dir), stop_after)
    try:
        if not world.is_main:
            return follow(cfg, world, stop_after)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        key = "hydra.sweep.dir" if sweep_group is not None else "hydra.run.dir"
        with run_dir_lock(run_dir, key):
            try:
                target, checkpoint, finished = resolve_resume(cfg, run_dir, world)
            except BaseException:
                broadcast(None, world)  # the other ranks stop too
                raise
            broadcast((str(target), finished is not None), world)
            if finished is not None:
                return finished
            with run_dir_lock(target, key) if target != run_dir else contextlib.nullcontext():
                run = build_run(cfg, target, checkpoint, sweep_group, world)
                run.created = started
                return run_rounds(run, callbacks if callbacks is not None else build_callbacks(cfg, stop_after,
                                                                                                world))
    finally:
        finish_workers(world, children)


def follow(cfg: DictConfig, world: World, stop_after: int | None) -> dict[str, Any]:
    """A rank > 0: the same run on rank 0's run dir and checkpoint, computing its share of every round;
    rank 0 alone evaluates, logs and writes."""
    plan = broadcast(None, world)
    if plan is None or plan[1]:  # rank 0 failed before the run, or the run had finished already
        return {}
    target = Path(plan[0])
    ckpt = target / "checkpoint.pt"
    checkpoint = None
    if cfg.resume in (True, "auto") and (ckpt.exists() or previous_path(ckpt).exists()):
        checkpoint = load_checkpoint(ckpt, run_device(cfg, world))
    run = build_run(cfg, target, checkpoint, None, world)
    run_rounds(run, follower_callbacks(cfg, stop_after, world))
    return {}
