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

GROUPS = ("method", "backbone", "dataset", "partition", "hardware", "logger", "experiment")
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 4
EXIT_SWEEP_FAILED = 1
PREFLIGHT_JOBS: dict[str, int] = {}  # how many jobs the pre-flight expanded the sweep into


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


def search_dirs(argv: list[str]) -> list[Path]:
    """Extra config dirs from a `hydra.searchpath=[file://DIR,...]` override (plugins' YAML presets)."""
    dirs: list[Path] = []
    for arg in argv:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            for item in arg.split("=", 1)[1].strip("[]").split(","):
                item = item.strip().strip("'\"")
                if item.startswith("file://"):
                    dirs.append(Path(item[len("file://"):]))
    return dirs


def available(group: str, extra_dirs: list[Path] | None = None) -> list[str]:
    roots = [resources.files("fedbench.conf") / group, *(d / group for d in extra_dirs or [])]
    return sorted({p.name[:-5] for root in roots if root.is_dir() for p in root.iterdir() if p.name.endswith(".yaml")})


def check_group_overrides(argv: list[str]) -> str | None:
    """One clear line for an unknown config-group choice (Hydra's own message is a wall of text)."""
    extra = search_dirs(argv)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS:
            continue
        choices = available(key, extra)
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


def _composition_error(e: Exception, job: list[str]) -> str:
    """Hydra's multi-line composition error as one line; an unknown key names the keys allowed there."""
    import re

    from hydra import compose
    from omegaconf import OmegaConf

    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    found = re.search(r"Could not override '([^']+)'", text)
    if found:
        key = found.group(1)
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in job if not o.lstrip("+~").startswith(key + "=")]
        try:
            node = OmegaConf.select(compose("config", overrides=rest), parent) if parent else None
        except Exception:  # noqa: BLE001 - fall back to Hydra's own words
            node = None
        if node is not None and OmegaConf.is_dict(node):
            return f"{key}: unknown key; allowed: {', '.join(sorted(node))}"
        return f"{key}: unknown key"
    cause = str(e.__cause__).splitlines()[0] if e.__cause__ is not None else ""
    return f"{text} {cause}".strip()


def unknown_added_key(job: list[str], cfg: object) -> str | None:
    """A top-level key added with `+` that no part of fedbench reads (e.g. a typo such as +roudns=3)."""
    from hydra import compose

    def added_key(o: str) -> str | None:
        key = o.lstrip("+").split("=", 1)[0]
        top = o.startswith("+") and not o.startswith("++") and "." not in key and "/" not in key
        return key if top and key not in GROUPS else None  # +experiment=NAME selects a preset

    top = [k for k in map(added_key, job) if k is not None]
    if not top:
        return None
    known = set(compose("config", overrides=[o for o in job if added_key(o) is None]))
    for key in top:
        if key not in known:
            return f"+{key}: unknown top-level key (nothing reads it); allowed: {', '.join(sorted(known))}"
    return None


def missing_sweeper(argv: list[str]) -> str | None:
    """hydra/sweeper=tune needs the Optuna sweeper plugin (an optional extra)."""
    import importlib.util

    if "hydra/sweeper=tune" in argv and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        return "hydra/sweeper=tune needs the optional package 'hydra-optuna-sweeper': pip install -e '.[tune]'"
    return None


def preflight(argv: list[str]) -> str | None:
    """Compose and validate every job's config before Hydra starts anything (a multirun is expanded the
    way Hydra's basic sweeper does it), so a bad key or value stops the command with one line and no
    job is launched. Returns the error line, or None. Options other than -m are left to Hydra."""
    from hydra import compose, initialize_config_module

    from fedbench.errors import ConfigError
    from fedbench.run.validation import validate

    multirun = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    if any(o.startswith("hydra/sweeper=") for o in overrides):
        return None
    jobs = [overrides]
    if multirun:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        PREFLIGHT_JOBS["n"] = len(jobs)
    with initialize_config_module(config_module="fedbench.conf", version_base="1.3"):
        for job in jobs:
            where = f" (in the job {' '.join(job)})" if multirun else ""
            try:
                cfg = compose("config", overrides=job)
                validate(cfg, check_device=False)
                unknown = unknown_added_key(job, cfg)
                if unknown:
                    return f"{unknown}{where}"
            except ConfigError as e:
                return f"{e}{where}"
            except Exception as e:  # noqa: BLE001 - Hydra / OmegaConf composition errors
                return f"{_composition_error(e, job)}{where}"
    return None


def _fail(msg: str, code: int) -> None:
    print(f"fedbench: error: {msg}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One job. In a sweep a job never exits the process or raises: it records how it ended in its
    summary.json (status + reason) and returns, so the launcher (SLURM included) always gets a result."""
    from fedbench.errors import ConfigError, DivergedError, Preempted, RunDirBusy
    from fedbench.experiment import format_summary, run_experiment
    from fedbench.run.loop import one_line
    from fedbench.sweep import record_failure

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep_group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    if sweep_group is not None:
        sweep_group = f"sweep-{Path(hc.sweep.dir).parent.name}-{sweep_group}"
    install_stop_handler()
    share_cores_with_parallel_jobs(cfg, hc)
    try:
        summary = run_experiment(cfg, run_dir, sweep_group=sweep_group)
    except Preempted as e:  # a requeued job continues from the checkpoint: not a result yet
        _fail(f"preempted: {e}; rerun the same command (resume=auto) to continue", EXIT_PREEMPTED)
    except RunDirBusy as e:  # the dir belongs to another run: touch nothing in it
        if sweep_group is None:
            _fail(str(e), EXIT_CONFIG)
        print(f"fedbench: job {hc.job.num}: {e}", file=sys.stderr)
        return None
    except Exception as e:
        status = "diverged" if isinstance(e, DivergedError) else "failed"
        if sweep_group is None and not isinstance(e, (ConfigError, DivergedError)):
            raise  # a bug in a single run: the traceback helps
        record_failure(run_dir, status, str(e) if isinstance(e, (ConfigError, DivergedError)) else one_line(e))
        if sweep_group is None:
            _fail(str(e), EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_DIVERGED)
        print(f"fedbench: job {hc.job.num} {status}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return float("nan")  # a tuning sweeper (Optuna) records the trial as failed
    if summary:  # ranks > 0 of a multi-process run return nothing: rank 0 reports
        print(format_summary(summary))
    return objective(summary)


def objective(summary: dict) -> float:
    """What a tuning sweeper maximises: validation only, never test (accuracy, R^2, or the clients'
    personal validation accuracy for methods without a global model)."""
    for key in ("best/val_acc", "best/val_r2", "best/personal_val_acc"):
        if summary.get(key) is not None:
            return float(summary[key])
    return float("nan")


def main() -> None:
    logging.getLogger("fedbench").setLevel(logging.INFO)
    argv = sys.argv[1:]
    msg = check_group_overrides(argv) or missing_sweeper(argv) or preflight(argv)
    if msg:
        _fail(msg, EXIT_CONFIG)
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
