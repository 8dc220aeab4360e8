"""The `fedbench` command: Hydra composes the config, fedbench validates, runs and logs."""

from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

GROUPS = ("method", "backbone", "dataset", "partition", "hardware", "logger")
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 4


def install_stop_handler() -> None:
    """On SIGTERM (SLURM preemption / requeue / scancel), finish the current round, write the checkpoint
    and exit; a rerun of the same job resumes from it. SIGUSR2 is left to submitit, which checkpoints and
    requeues jobs that reach their time limit."""
    import signal
    import threading

    from fedbench.experiment import StopFlag

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # noqa: ANN001
        StopFlag.requested = True
        logging.getLogger("fedbench").warning("SIGTERM: stopping after this round with a checkpoint")
        if callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def available(group: str) -> list[str]:
    root = resources.files("fedbench.conf") / group
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def check_group_overrides(argv: list[str]) -> str | None:
    """One clear line for an unknown config-group choice (Hydra's own message is a wall of text)."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS:
            continue
        choices = available(key)
        values = value.split(",") if value and not value.startswith(("range(", "choice(", "glob(")) else [value]
        for v in values:
            if v and v not in choices:
                return f"{key}={v!r} is unknown; allowed: {', '.join(choices)}"
    return None


def share_cores_with_parallel_jobs(cfg: DictConfig, hc: object) -> None:
    """Under the joblib launcher (e.g. hydra/launcher=local_parallel), jobs share this machine: unless
    hardware.threads is set, give each job cores // n_jobs torch threads instead of all cores."""
    import os

    import torch

    target = str(hc.launcher.get("_target_") or "")
    if "Joblib" not in target or cfg.hardware.get("threads"):
        return
    cores = os.cpu_count() or 1
    n_jobs = int(hc.launcher.get("n_jobs", -1) or -1)
    n_jobs = cores if n_jobs < 1 else n_jobs
    torch.set_num_threads(max(1, cores // n_jobs))
    logging.getLogger("fedbench").info("joblib launcher: %d jobs share %d cores -> %d torch threads per job",
                                       n_jobs, cores, torch.get_num_threads())


def _fail(msg: str, code: int) -> None:
    print(f"fedbench: error: {msg}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from fedbench.errors import ConfigError
    from fedbench.experiment import DivergedError, Preempted, format_summary, run_experiment

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep_group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    if sweep_group is not None:
        sweep_group = f"sweep-{Path(hc.sweep.dir).parent.name}-{sweep_group}"
    install_stop_handler()
    share_cores_with_parallel_jobs(cfg, hc)
    try:
        summary = run_experiment(cfg, run_dir, sweep_group=sweep_group)
    except ConfigError as e:
        _fail(str(e), EXIT_CONFIG)
    except DivergedError as e:
        if sweep_group is not None:  # one diverged run is a result of the sweep, not a reason to stop it
            print(f"fedbench: warning: {e} (status 'diverged' in summary.json; the sweep goes on)", file=sys.stderr)
            return None
        _fail(str(e), EXIT_DIVERGED)
    except Preempted as e:
        _fail(f"preempted: {e}; rerun the same command (resume=auto) to continue", EXIT_PREEMPTED)
    print(format_summary(summary))
    return summary.get("best/val_acc")


def main() -> None:
    logging.getLogger("fedbench").setLevel(logging.INFO)
    msg = check_group_overrides(sys.argv[1:])
    if msg:
        _fail(msg, EXIT_CONFIG)
    _hydra_main()


if __name__ == "__main__":
    main()
