"""Who may write into a run dir or a sweep dir, decided BEFORE Hydra writes anything there.

A Hydra callback (conf/config.yaml, `hydra.callbacks.ownership`) runs when the command starts, before
Hydra creates the run dir or the sweep's job dirs and writes `.hydra/`:
- the dir must be writable, with some free space;
- a dir another fedbench process is writing (its lock is held) is refused;
- a dir that holds a run of another config is refused, naming what differs (a sweep dir: job by job, or
  by the sweep's record for tuning sweeps, whose jobs are not known in advance);
- otherwise this process takes the lock and holds it to the end (for a sweep: the sweep dir's lock).
A refused command prints one line naming the key to change (`hydra.run.dir` / `hydra.sweep.dir`), exits
with 2 and leaves every byte on disk as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fedbench.errors import ConfigError, RunDirTaken
from fedbench.run.lock import RUN_LOCK, SWEEP_LOCK, acquire, busy_error, hold, owner_of
from fedbench.run.state import fingerprint, semantic_config

MIN_FREE_BYTES = 64 * 2**20
SWEEP_RECORD = ".fedbench-sweep.json"


def check_writable(path: Path, key: str) -> None:
    """`path` can be created and written, and its disk has room; creates it (Hydra would next)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        free = shutil.disk_usage(path).free
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot write there ({e.strerror or e}); choose another {key}") from None
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"{key}={path}: only {free / 2**20:.0f} MiB free on its disk; free some space or "
                          f"choose another {key}")


def recorded_config(run_dir: Path) -> tuple[str | None, DictConfig | None]:
    """(fingerprint, config) of the run a dir holds: the checkpoint's fingerprint where there is one (what
    resume compares), else that of the config Hydra saved; (None, None) for a dir without a run."""
    cfg = None
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        try:
            cfg = OmegaConf.load(saved)
        except Exception:  # noqa: BLE001 - an unreadable record: judged by the checkpoint alone
            cfg = None
    state = run_dir / "run_state.json"
    if state.is_file():
        try:
            return str(json.loads(state.read_text())["fingerprint"]), cfg
        except (OSError, ValueError, KeyError):
            pass
    return (fingerprint(cfg), cfg) if cfg is not None else (None, None)


def differences(old: DictConfig | None, new: DictConfig, limit: int = 3) -> str:
    """'lr 0.05 -> 0.1, seed 0 -> 1' for the first keys where two configs differ."""
    if old is None:
        return "its config differs"

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    try:
        a, b = flat(semantic_config(old)), flat(semantic_config(new))
    except Exception:  # noqa: BLE001 - an old config that no longer resolves
        return "its config differs"
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    shown = ", ".join(f"{k} {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys[:limit])
    return f"differs in {shown}{' ...' if len(keys) > limit else ''}" if keys else "its config differs"


def task_config(config: DictConfig) -> DictConfig:
    """The job's config without Hydra's own node (what the run receives)."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


def refuse_other_run(run_dir: Path, new: DictConfig, key: str, job: str = "") -> None:
    old_fp, old_cfg = recorded_config(run_dir)
    if old_fp is not None and old_fp != fingerprint(new):
        raise RunDirTaken(f"{key}={run_dir.parent if job else run_dir} holds {'another sweep' if job else 'a run'}"
                          f" of a different config ({job}{differences(old_cfg, new)}); choose another {key}, "
                          f"or delete that dir to start over")


def refuse_other_rank_config(run_dir: Path, new: DictConfig, key: str, tries: int = 20) -> None:
    """`refuse_other_run` for a rank > 0: rank 0 may be writing `.hydra/config.yaml` at this very moment
    (Hydra does not write it atomically), so a half-written record is read again before it is judged."""
    for attempt in range(tries):
        try:
            refuse_other_run(run_dir, new, key)
            return
        except RunDirTaken:
            if attempt == tries - 1:
                raise
            time.sleep(0.25)


def is_rank_zero() -> bool:
    """Ranks > 0 of an outside launcher (torchrun) write nothing: rank 0 takes the run dir."""
    from fedbench.engine.distributed import world_from_env

    world = world_from_env()
    return world is None or world[0] == 0


def guard_run(config: DictConfig) -> None:
    """A single run: refuse a busy dir or one holding another config's run; then hold its lock."""
    run_dir = Path(str(config.hydra.run.dir))
    key = "hydra.run.dir"
    if not is_rank_zero():  # rank 0 of the same run holds the dir; a changed config is still refused
        refuse_other_rank_config(run_dir, task_config(config), key)
        return
    owner = owner_of(run_dir / RUN_LOCK)
    if owner is not None:
        raise busy_error(run_dir, owner, key)
    refuse_other_run(run_dir, task_config(config), key)
    check_writable(run_dir, key)
    f = acquire(run_dir)
    if f is None:
        raise busy_error(run_dir, owner_of(run_dir / RUN_LOCK) or "another process", key)
    hold(run_dir, f)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        return []
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def guard_sweep(config: DictConfig, planned: list[tuple[str, list[str]]] | None) -> None:
    """A sweep: refuse a sweep dir another fedbench sweep is using, or one holding another sweep (job by
    job where the pre-flight knows the jobs: `planned` = [(fingerprint, overrides)] in job order; by the
    sweep's record otherwise, e.g. for tuning sweeps); then hold the sweep dir's lock."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    key = "hydra.sweep.dir"
    owner = owner_of(sweep_dir / SWEEP_LOCK)
    if owner is not None:
        raise busy_error(sweep_dir, owner, key, what="sweep")
    jobs = _job_dirs(sweep_dir)
    overrides = sorted(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    record_path = sweep_dir / SWEEP_RECORD
    numbered = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") == "${hydra.job.num}"
    for job in jobs:
        owner = owner_of(job / RUN_LOCK)
        if owner is not None:
            raise busy_error(sweep_dir, f"its job {job.name} is still running: {owner}", key, what="sweep")
    fingerprints = [fp for fp, _ in planned] if planned is not None else None
    if jobs and planned is not None and numbered:
        if int(jobs[-1].name) >= len(planned):
            raise RunDirTaken(f"{key}={sweep_dir} holds another sweep ({int(jobs[-1].name) + 1} or more jobs; this "
                              f"one has {len(planned)}); choose another {key}, or delete that dir to start over")
        for job in jobs:
            old_fp, old_cfg = recorded_config(job)
            new_fp, new_overrides = planned[int(job.name)]
            if old_fp is not None and old_fp != new_fp:
                raise RunDirTaken(f"{key}={sweep_dir} holds another sweep (its job {job.name} "
                                  f"{override_changes(_overrides_of(job), new_overrides)}); choose another {key}, "
                                  f"or delete that dir to start over")
    elif jobs:
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = None
        if record is None or record.get("overrides") != overrides:
            raise RunDirTaken(f"{key}={sweep_dir} holds another sweep ({len(jobs)} job dirs"
                              f"{', started with: ' + ' '.join(record['overrides']) if record else ''}); choose "
                              f"another {key}, or delete that dir to start over")
    check_writable(sweep_dir, key)
    f = acquire(sweep_dir, SWEEP_LOCK)
    if f is None:
        raise busy_error(sweep_dir, owner_of(sweep_dir / SWEEP_LOCK) or "another process", key, what="sweep")
    hold(sweep_dir, f)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"overrides": overrides, "jobs": len(fingerprints) if fingerprints else None,
                               "fingerprints": fingerprints}, indent=1) + "\n")
    os.replace(tmp, record_path)


def override_changes(old: list[str], new: list[str], limit: int = 3) -> str:
    """'differs in lr (unset) -> 0.1' between two jobs' override lists (Hydra's own keys left out)."""
    def as_dict(overrides: list[str]) -> dict[str, str]:
        pairs = (o.lstrip("+~").partition("=") for o in overrides)
        return {k: v for k, _, v in pairs if not k.startswith("hydra")}

    a, b = as_dict(old), as_dict(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not keys:
        return "ran another config"
    shown = ", ".join(f"{k} {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in keys[:limit])
    return f"differs in {shown}{' ...' if len(keys) > limit else ''}"


def _overrides_of(job: Path) -> list[str]:
    try:
        return [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
    except Exception:  # noqa: BLE001 - no record: the message says where to look
        return []


class OwnershipGuard(Callback):
    """Hydra callback: the checks above at the start of a run or a sweep; a refusal is one line, exit 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(guard_run, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from fedbench.preflight import PREFLIGHT_JOBS

        planned = PREFLIGHT_JOBS.get("planned") if PREFLIGHT_JOBS.get("n") else None
        self._guard(lambda c: guard_sweep(c, planned), config)

    @staticmethod
    def _guard(check: Any, config: DictConfig) -> None:
        try:
            check(config)
        except ConfigError as e:
            print(f"fedbench: error: {e}", file=sys.stderr)
            sys.exit(2)
