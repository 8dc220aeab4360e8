"""`hydra/launcher=fused`: a whole multirun in one process, the jobs that can share one computation run
as fused groups (fedbench.run.fused), the others one after the other as the basic launcher runs them.

Every job is composed and prepared by Hydra's own code (its run dir, `.hydra/` files, overrides), ends
with its own summary.json, metrics, checkpoint and W&B run, and hands the sweeper its objective. Jobs are
grouped by everything but the keys that may differ inside a group: the seed, the partition's values,
the client lr (and its schedule), the method's declared `run_keys`, and keys that do not change the
computation (logging, evaluation and checkpoint cadence, paper notes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from fedbench.composition import shared_composition
from fedbench.data.federation import departure
from fedbench.engine.fused import reuse_large_allocations
from fedbench.errors import ConfigError, Preempted
from fedbench.registry import lookup
from fedbench.run.build import flatten
from fedbench.run.fused import Outcome, open_run, run_group
from fedbench.run.state import semantic_config

log = logging.getLogger("fedbench")

# top-level keys a fused group's runs may differ in (each run draws its own from them)
PER_RUN = ("seed", "lr", "lr_schedule", "partition", "eval_every", "metrics", "paper")


def group_signature(cfg: DictConfig) -> dict[str, Any]:
    """What must be equal for jobs to share one computation (flattened, plain values)."""
    data = semantic_config(cfg)
    for key in PER_RUN:
        data.pop(key, None)
    method_cls = lookup("method", str(cfg.method.name))
    for key in method_cls.run_keys:
        data.get("method", {}).pop(key, None)
    return flatten(data)


def alone_reason(cfg: DictConfig) -> str | None:
    """Why a job can never share a computation (None: it can)."""
    method_cls = lookup("method", str(cfg.method.name))
    if not method_cls.fusable:
        return f"method {cfg.method.name} does not declare itself fusable"
    if int(cfg.hardware.workers) > 1:
        return f"hardware.workers={cfg.hardware.workers} (a run over several processes)"
    federation = departure(cfg) or ("partition=file" if str(cfg.partition.name) == "file" else None)
    if federation is not None:  # (a partition file may hold clients out)
        return f"{federation}: its cohorts may differ from its peers' (availability, held-out clients, dropouts)"
    return None


def plan_groups(cfgs: Sequence[DictConfig], max_fused: int) -> list[tuple[list[int], str | None]]:
    """The jobs' indices in groups, in the order of their first job, at most `max_fused` a group; each
    with the reason a job runs alone (None for a group, or a lone job that simply had no partner)."""
    groups: dict[str, list[int]] = {}
    alone: list[tuple[list[int], str | None]] = []
    signatures: list[dict[str, Any]] = []
    for i, cfg in enumerate(cfgs):
        why = alone_reason(cfg)
        sig = group_signature(cfg)
        signatures.append(sig)
        if why is not None:
            alone.append(([i], why))
            continue
        groups.setdefault(json.dumps(sig, sort_keys=True, default=str), []).append(i)
    planned: list[tuple[list[int], str | None]] = list(alone)
    for members in groups.values():
        for start in range(0, len(members), max_fused):
            chunk = members[start:start + max_fused]
            why = None
            if len(chunk) == 1 and len(cfgs) > 1:
                other = next(j for j in range(len(cfgs)) if j != chunk[0])
                keys = [k for k in sorted(set(signatures[chunk[0]]) | set(signatures[other]))
                        if signatures[chunk[0]].get(k) != signatures[other].get(k)][:3]
                why = ("it differs from the others in " + ", ".join(keys)) if keys else "max_fused=1"
            planned.append((chunk, why))
    return sorted(planned, key=lambda g: g[0][0])


@dataclass
class PreparedJob:
    ret: JobReturn
    cfg: DictConfig
    run_dir: Path
    num: int
    log_name: str


class FusedSweepLauncher(Launcher):
    """Hydra's launcher interface; see the module docstring."""

    def __init__(self, max_fused: int = 64) -> None:
        if not isinstance(max_fused, int) or isinstance(max_fused, bool) or max_fused < 1:
            raise ConfigError(f"hydra.launcher.max_fused={max_fused}: must be an integer >= 1")
        self.max_fused = max_fused
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from fedbench.cli import install_stop_handler, sweep_group_name

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        install_stop_handler()
        reuse_large_allocations()
        started = time.perf_counter()
        jobs = self._prepare(job_overrides, initial_job_idx)
        plan = plan_groups([j.cfg for j in jobs], self.max_fused)
        log.info("fused launcher: %d jobs in %d group(s): %s (prepared in %.1f s)", len(jobs), len(plan),
                 ", ".join(f"{len(g)}" for g, _ in plan), time.perf_counter() - started)
        group_name = sweep_group_name(sweep_dir)
        for members, why in plan:
            if why is not None:
                log.info("fused launcher: job %d runs alone: %s", jobs[members[0]].num, why)
            run_members([jobs[i] for i in members], group_name)
        return [j.ret for j in jobs]

    def _prepare(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[PreparedJob]:
        """Each job's config and run dir, prepared by Hydra's run_job (dirs, .hydra/ files, callbacks);
        the runs themselves come after, in groups."""
        assert self.config is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        jobs: list[PreparedJob] = []

        def capture(task_cfg: DictConfig) -> tuple[DictConfig, str]:
            return task_cfg, str(HydraConfig.get().runtime.output_dir)

        with shared_composition():
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                sweep_config = loader.load_sweep_config(self.config, list(overrides))
                with open_dict(sweep_config):
                    sweep_config.hydra.job.id = idx
                    sweep_config.hydra.job.num = idx
                ret = run_job(hydra_context=self.hydra_context, task_function=capture, config=sweep_config,
                              job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
                              configure_logging=False)
                task_cfg, out_dir = ret.return_value
                ret.return_value = None
                jobs.append(PreparedJob(ret, task_cfg, Path(out_dir), idx, str(sweep_config.hydra.job.name)))
        return jobs


def run_members(jobs: list[PreparedJob], sweep_group: str) -> None:
    """One group (or a lone job) to its end; every job's outcome recorded as a sweep job's is."""
    from fedbench.cli import EXIT_PREEMPTED, _fail, objective, sweep_job_failed
    from fedbench.experiment import run_experiment

    handlers = _job_logs(jobs)
    try:
        if len(jobs) == 1:
            job = jobs[0]
            try:
                outcomes = [Outcome(run_experiment(job.cfg, job.run_dir, sweep_group=sweep_group))]
            except BaseException as e:  # noqa: BLE001 - recorded below like a group member's
                outcomes = [Outcome({}, e)]
        else:
            outcomes = _run_group(jobs, sweep_group)
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()
    preempted = None
    for job, outcome in zip(jobs, outcomes, strict=True):
        job.ret.status = JobStatus.COMPLETED
        if outcome.error is None:
            job.ret.return_value = objective(outcome.summary) if outcome.summary else None
            continue
        if not isinstance(outcome.error, Exception):  # KeyboardInterrupt, SystemExit
            raise outcome.error
        if isinstance(outcome.error, Preempted):  # a requeued sweep continues from the checkpoints
            preempted = outcome.error
            continue
        job.ret.return_value = sweep_job_failed(job.run_dir, job.num, outcome.error)
    if preempted is not None:
        _fail(f"preempted: {preempted}; rerun the same command (resume=auto) to continue", EXIT_PREEMPTED)


def _run_group(jobs: list[PreparedJob], sweep_group: str) -> list[Outcome]:
    outcomes: dict[int, Outcome] = {}
    started = time.perf_counter()
    with contextlib.ExitStack() as locks:
        runs, where = [], []
        for k, job in enumerate(jobs):
            try:
                opened = open_run(job.cfg, job.run_dir, sweep_group, locks)
            except Exception as e:  # noqa: BLE001 - this job alone fails; the group goes on
                outcomes[k] = Outcome({}, e)
                continue
            if isinstance(opened, dict):  # finished already: its summary stands
                outcomes[k] = Outcome(opened)
                continue
            runs.append(opened)
            where.append(k)
        if runs:
            log.info("fused group: %d runs built in %.1f s", len(runs), time.perf_counter() - started)
            for k, outcome in zip(where, run_group(runs), strict=True):
                outcomes[k] = outcome
    return [outcomes[k] for k in range(len(jobs))]


def _job_logs(jobs: list[PreparedJob]) -> list[logging.Handler]:
    """The group's log lines also go to each job's own log file, as a separate job's would."""
    handlers: list[logging.Handler] = []
    for job in jobs:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(job.run_dir / f"{job.log_name}.log")
        h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(h)
        handlers.append(h)
    return handlers

