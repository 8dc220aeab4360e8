"""fedbench's SLURM launcher (`hydra/launcher=slurm`): submitit's array submission, but a launching
command that never waits forever on a cluster without accounting.

submitit learns that a job ended from `sacct`; without accounting a cancelled task or a job that can
never be scheduled leaves it polling silently. Here the launching command watches what the cluster does
offer: each job's result file and `squeue` (state and reason, no accounting needed). A job that left the
queue without a result was cancelled, preempted or killed: its summary.json says so ("preempted": its
checkpoint lets the same command resume it). A job PENDING for a reason no wait can cure (its request
exceeds the partition: PartitionConfig, PartitionNodeLimit, ...) is cancelled and recorded as failed with
that reason and the keys to change. The sweep then ends with its account, exit 1. Multi-task jobs run
under `srun --kill-on-bad-exit=1`, so one dead rank ends its siblings.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from fedbench.sweep import record_failure

log = logging.getLogger("fedbench")

# PENDING reasons that no amount of waiting cures: the request does not fit the partition or account
NEVER_SCHEDULED = {
    "PartitionConfig": "the request exceeds what the partition's nodes offer",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "a longer time limit than the partition allows",
    "BadConstraints": "constraints no node satisfies",
    "InvalidQOS": "an invalid QOS",
    "InvalidAccount": "an invalid account",
    "DependencyNeverSatisfied": "a dependency that can never be satisfied",
}
KEYS_TO_CHANGE = ("hydra.launcher.cpus_per_task, tasks_per_node, mem_gb, gpus_per_node, nodes, timeout_min or "
                  "partition")
POLL_S = float(os.environ.get("FEDBENCH_SLURM_POLL_S", "2"))
# a job out of the queue gets this long for its result file to appear (shared file systems lag)
GONE_GRACE_S = float(os.environ.get("FEDBENCH_SLURM_GRACE_S", "15"))


def queue_states(array_ids: set[str]) -> dict[str, tuple[str, str]] | None:
    """{job id (ARRAY_TASK): (state, reason)} of the jobs still in the queue; None when squeue failed
    (then nothing is concluded from it)."""
    if not array_ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(sorted(array_ids)), "-o", "%i|%T|%r"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # every job left the queue
            return {}
        return None
    states = {}
    for line in out.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        states[job_id.strip()] = (state.strip(), reason.strip())
    return states


class WaitingSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with a waiting loop that always ends (see the module)."""

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        import submitit

        assert self.config is not None
        params = dict(self.params)
        executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        if int(params.get("tasks_per_node") or 1) * int(params.get("nodes") or 1) > 1:
            executor.update_parameters(slurm_srun_args=["--kill-on-bad-exit=1"])
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        args = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        try:
            jobs = executor.map_array(self, *zip(*args, strict=True))
        except Exception as e:  # noqa: BLE001 - sbatch refused the array: nothing was submitted
            lines = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or [str(e).strip()]
            print(f"fedbench: error: hydra/launcher=slurm: sbatch refused the jobs ({lines[-1][:200]}); "
                  f"change {KEYS_TO_CHANGE}", file=sys.stderr)
            sys.exit(2)
        log.info("submitted %d SLURM job(s) as array %s; waiting for them (squeue, no accounting needed)",
                 len(jobs), jobs[0].job_id.split("_")[0] if jobs else "-")
        return wait_for(jobs, [sweep_dir / str(initial_job_idx + i) for i in range(len(jobs))],
                        [list(o) for o in job_overrides])


def wait_for(jobs: list[Any], run_dirs: list[Path], overrides: list[list[str]]) -> list[JobReturn]:
    """Every job's JobReturn once it ended, whichever way: result file, gone from the queue, or never
    schedulable."""
    results: list[JobReturn | None] = [None] * len(jobs)
    pending = dict(enumerate(jobs))
    gone_since: dict[int, float] = {}
    while pending:
        states = queue_states({job.job_id.split("_")[0] for job in pending.values()})
        for i, job in list(pending.items()):
            outcome = _outcome(job, states, gone_since, i, run_dirs[i], overrides[i])
            if outcome is not None:
                results[i] = outcome
                del pending[i]
        if pending:
            time.sleep(POLL_S)
    return [r for r in results if r is not None]


def _outcome(job: Any, states: dict[str, tuple[str, str]] | None, gone_since: dict[int, float], i: int,
             run_dir: Path, overrides: list[str]) -> JobReturn | None:
    if job.paths.result_pickle.exists():
        try:
            return job.results()[0]
        except Exception as e:  # noqa: BLE001 - the job's function raised: recorded, the sweep goes on
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return _ended(run_dir, overrides, "failed", f"SLURM job {job.job_id}: {reason[:200]}")
    if states is None:  # squeue failed this time: conclude nothing
        return None
    state = states.get(job.job_id)
    if state is None:
        first = gone_since.setdefault(i, time.time())
        if time.time() - first < GONE_GRACE_S:
            return None
        return _gone(job, run_dir, overrides)
    gone_since.pop(i, None)
    status, reason = state
    if status == "PENDING" and reason in NEVER_SCHEDULED:
        subprocess.run(["scancel", job.job_id], capture_output=True)
        return _ended(run_dir, overrides, "failed",
                      f"never scheduled: SLURM keeps job {job.job_id} PENDING ({reason}: "
                      f"{NEVER_SCHEDULED[reason]}); cancelled it; change {KEYS_TO_CHANGE}")
    return None


def _gone(job: Any, run_dir: Path, overrides: list[str]) -> JobReturn:
    """A job that left the queue without a result: cancelled, preempted without requeue, or killed."""
    import json

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("status") in ("completed", "failed", "diverged"):
        return _ended(run_dir, overrides, summary["status"], summary.get("reason", ""))
    ckpt = run_dir / "run_state.json"
    try:
        done = json.loads(ckpt.read_text()).get("round")
    except (OSError, ValueError):
        done = None
    where = f"its checkpoint (round {done}) lets the same command resume it" if done else "no checkpoint yet"
    return _ended(run_dir, overrides, "preempted",
                  f"SLURM job {job.job_id} left the queue without a result (scancel, preemption or a killed "
                  f"node); {where}; its log: {job.paths.stderr}")


def _ended(run_dir: Path, overrides: list[str], status: str, reason: str) -> JobReturn:
    """Record how a job ended in its summary.json (unless it did so itself) and hand Hydra a result
    that never raises (NaN: a tuning sweeper counts the trial as failed)."""
    if status != "completed":
        record_failure(run_dir, status, reason)
    return JobReturn(overrides=overrides, working_dir=str(run_dir), status=JobStatus.COMPLETED,
                     _return_value=float("nan") if status != "completed" else None)
