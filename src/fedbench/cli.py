"""The `fedbench` command: Hydra composes the config, fedbench validates, runs and logs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fedbench.composition import shared_composition
from fedbench.metrics import names
from fedbench.preflight import GROUPS, PREFLIGHT_JOBS, available, check_group_overrides, missing_sweeper, preflight

__all__ = ["GROUPS", "available", "check_group_overrides", "main", "preflight"]

EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 4
EXIT_SWEEP_FAILED = 1


def install_stop_handler() -> None:
    """On SIGTERM (SLURM preemption / requeue / scancel), finish the current round, write the checkpoint
    and exit; a rerun of the same job resumes from it. SIGUSR2 is left to submitit, which checkpoints and
    requeues jobs that reach their time limit."""
    import signal
    import threading

    from fedbench.run.callbacks import StopFlag

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # noqa: ANN001
        StopFlag.requested = True
        logging.getLogger("fedbench").warning("SIGTERM: stopping after this round with a checkpoint")
        if callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def share_cores_with_parallel_jobs(cfg: DictConfig, hc: object) -> None:
    """Under the joblib launcher (e.g. hydra/launcher=local_parallel), jobs share this machine: unless
    hardware.threads is set, give each job cores // n_jobs torch threads instead of all cores."""
    import os

    import torch

    target = str(hc.launcher.get("_target_") or "")
    if "Joblib" not in target or cfg.hardware.threads:
        return
    cores = os.cpu_count() or 1
    n_jobs = int(hc.launcher.get("n_jobs", -1) or -1)
    n_jobs = cores if n_jobs < 1 else n_jobs
    torch.set_num_threads(max(1, cores // n_jobs))
    logging.getLogger("fedbench").info("joblib launcher: %d jobs share %d cores -> %d torch threads per job",
                                       n_jobs, cores, torch.get_num_threads())


def register_plugins() -> None:
    """fedbench's own Hydra plugins (hydra/launcher=slurm). Hydra finds plugins by scanning the
    `hydra_plugins` namespace, which an editable install does not expose to its scan: register them."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.fedbench_launcher.fused import FusedLauncher
    from hydra_plugins.fedbench_launcher.slurm import FedbenchSlurmLauncher

    Plugins.instance().register(FedbenchSlurmLauncher)
    Plugins.instance().register(FusedLauncher)


def disk_error(e: BaseException) -> str | None:
    """A write the machine refused mid-run (disk full, quota, read-only, file too large) as one line, or
    None for any other error. The checkpoint is written atomically, so the last one is intact."""
    import errno

    if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG,
                                                     errno.EACCES, errno.EIO):
        return None
    where = f" {e.filename}" if e.filename else ""
    return (f"cannot write{where}: {e.strerror}; nothing already written was lost (the last checkpoint is "
            f"intact): free space and rerun the same command to resume")


def _fail(msg: str, code: int) -> None:
    print(f"fedbench: error: {msg}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One job. In a sweep a job never exits the process or raises: it records how it ended in its
    summary.json (status + reason) and returns, so the launcher (SLURM included) always gets a result."""
    from fedbench.errors import ConfigError, DivergedError, Preempted, RunDirBusy
    from fedbench.experiment import format_summary, run_experiment
    from fedbench.sweep import record_failure

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep_group = sweep_group_name(Path(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None
    install_stop_handler()
    share_cores_with_parallel_jobs(cfg, hc)
    try:
        summary = run_experiment(cfg, run_dir, sweep_group=sweep_group)
    except Preempted as e:  # a requeued job continues from the checkpoint: not a result yet
        _fail(f"preempted: {e}; rerun the same command (resume=auto) to continue", EXIT_PREEMPTED)
    except RunDirBusy as e:  # the dir belongs to another run: touch nothing in it
        if sweep_group is None:
            _fail(str(e), EXIT_CONFIG)
        return sweep_job_failed(run_dir, hc.job.num, e)
    except Exception as e:
        if sweep_group is not None:
            return sweep_job_failed(run_dir, hc.job.num, e)
        disk = disk_error(e)
        if not isinstance(e, (ConfigError, DivergedError)) and disk is None:
            raise  # a bug in a single run: the traceback helps
        status, reason = failure_of(e)
        try:
            record_failure(run_dir, status, reason)
        except OSError:  # the disk that failed may be the run dir's: the line below still says why
            pass
        _fail(reason, EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_DIVERGED if status == "diverged"
              else EXIT_SWEEP_FAILED)
    if summary:  # ranks > 0 of a multi-process run return nothing: rank 0 reports
        print(format_summary(summary))
    return objective(summary)


def sweep_group_name(sweep_dir: Path) -> str:
    """The W&B group of a sweep's jobs: its date and time dirs."""
    return f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"


def failure_of(e: Exception) -> tuple[str, str]:
    """(status, one-line reason) of a job that ended with `e`."""
    from fedbench.errors import ConfigError, DivergedError
    from fedbench.run.loop import one_line

    status = "diverged" if isinstance(e, DivergedError) else "failed"
    reason = disk_error(e) or (str(e) if isinstance(e, (ConfigError, DivergedError)) else one_line(e))
    return status, reason


def sweep_job_failed(run_dir: Path, job_num: int, e: Exception) -> float | None:
    """A sweep job that did not complete never stops the sweep: its summary.json says how it ended, one
    line says so here; returns what a tuning sweeper gets (NaN: a failed trial; None: not this run's)."""
    from fedbench.errors import RunDirBusy
    from fedbench.sweep import record_failure

    if isinstance(e, RunDirBusy):  # the dir belongs to another run: touch nothing in it
        print(f"fedbench: job {job_num}: {e}", file=sys.stderr)
        return None
    status, reason = failure_of(e)
    try:
        record_failure(run_dir, status, reason)
    except OSError:  # the disk that failed may be the run dir's: the line below still says why
        pass
    print(f"fedbench: job {job_num} {status}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
          file=sys.stderr)
    return float("nan")  # a tuning sweeper (Optuna) records the trial as failed


def objective(summary: dict) -> float:
    """What a tuning sweeper maximises: validation only, never test (accuracy, R^2, or the clients'
    personal validation accuracy for methods without a global model)."""
    for key in names.BEST_VALIDATION_KEYS:
        if summary.get(key) is not None:
            return float(summary[key])
    return float("nan")


def main() -> None:
    logging.getLogger("fedbench").setLevel(logging.INFO)
    argv = sys.argv[1:]
    with shared_composition():  # every job of a sweep is composed several times: Hydra's files read once
        msg = check_group_overrides(argv) or missing_sweeper(argv) or preflight(argv)
        if msg:
            _fail(msg, EXIT_CONFIG)
        register_plugins()
        _hydra_main()
    if any(a in ("-m", "--multirun") for a in argv):
        from fedbench.sweep import SweepAccount, account

        if SweepAccount.sweep_dir is not None:
            text, ok = account(SweepAccount.sweep_dir, PREFLIGHT_JOBS.get("n"))
            print(text, file=sys.stderr)
            if not ok:
                sys.exit(EXIT_SWEEP_FAILED)


if __name__ == "__main__":
    main()
