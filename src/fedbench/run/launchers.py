"""The launcher's and the sweeper's own keys, checked before any job starts (`check_hydra_config`), and
what a SLURM partition can give, read from `sinfo` (no accounting needed)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedbench.errors import ConfigError

# (key, smallest allowed, integer?) of the numeric launcher keys fedbench's presets and docs use
SUBMITIT_KEYS = (("timeout_min", 1, True), ("cpus_per_task", 1, True), ("gpus_per_node", 0, True),
                 ("tasks_per_node", 1, True), ("mem_gb", 0, False), ("nodes", 1, True),
                 ("array_parallelism", 1, True), ("signal_delay_s", 0, True), ("max_num_timeout", 0, True))
OPTUNA_KEYS = (("n_trials", 1, True), ("n_jobs", 1, True))


def _numbers(node: DictConfig, prefix: str, keys: tuple[tuple[str, float, bool], ...]) -> None:
    for key, low, integer in keys:
        if key not in node or node[key] is None:
            continue
        v = node[key]
        ok = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
        ok = ok and math.isfinite(v) and (v >= low if integer else v > low)
        if not ok:
            kind = "an integer" if integer else "a number"
            bound = f">= {low}" if integer else f"> {low}"
            raise ConfigError(f"{prefix}.{key}={v}: must be {kind} {bound}")


def check_hydra_config(hc: DictConfig, n_jobs: int) -> None:
    """The launcher's and the sweeper's keys: numbers in range, and on SLURM a request the partition can
    run (otherwise the job would wait forever, PENDING)."""
    launcher = OmegaConf.to_container(hc.launcher, resolve=False)
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        n = launcher.get("n_jobs")
        if not isinstance(n, int) or isinstance(n, bool) or n == 0:
            raise ConfigError(f"hydra.launcher.n_jobs={n}: must be an integer >= 1 (or -1: one job per core)")
    if "FusedLauncher" in target:
        _numbers(hc.launcher, "hydra.launcher", (("max_fused", 1, True),))
    if "submitit" in target.lower() or "SlurmLauncher" in target:
        _numbers(hc.launcher, "hydra.launcher", SUBMITIT_KEYS)
    if "SlurmLauncher" in target:
        check_slurm_request(launcher)
    sweeper = OmegaConf.to_container(hc.sweeper, resolve=False)
    if "optuna" in str(sweeper.get("_target_", "")).lower():
        _numbers(hc.sweeper, "hydra.sweeper", OPTUNA_KEYS)
        direction = sweeper.get("direction")
        if direction not in ("minimize", "maximize") and not isinstance(direction, list):
            raise ConfigError(f"hydra.sweeper.direction={direction}: allowed: maximize, minimize")


@dataclass(frozen=True)
class SlurmPartition:
    name: str
    cpus: int          # CPUs of its largest node
    memory_mb: int     # memory of its largest node
    gpus: int          # GPUs of its largest node (from its gres)
    nodes: int
    time_limit_min: float  # inf: no limit
    default: bool


def _minutes(limit: str) -> float:
    """sinfo's time limit ([days-]hours:minutes:seconds, or infinite) in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a"):
        return math.inf
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60


def slurm_partitions() -> list[SlurmPartition]:
    """The cluster's partitions as `sinfo` reports them (one line per partition and node kind)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%D|%l"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ConfigError(f"hydra/launcher=slurm: sinfo failed here ({out.stderr.strip()[:120]}); launch the "
                          f"sweep from a node of the SLURM cluster")
    found: dict[str, SlurmPartition] = {}
    for line in out.stdout.splitlines():
        name, cpus, mem, gres, nodes, limit = line.split("|")
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres))
        part = SlurmPartition(name.rstrip("*"), int(cpus.rstrip("+")), int(mem.rstrip("+")), gpus,
                              int(nodes), _minutes(limit), name.endswith("*"))
        old = found.get(part.name)
        if old is not None:  # several node kinds: what its largest node offers
            part = SlurmPartition(part.name, max(old.cpus, part.cpus), max(old.memory_mb, part.memory_mb),
                                  max(old.gpus, part.gpus), old.nodes + part.nodes,
                                  max(old.time_limit_min, part.time_limit_min), old.default or part.default)
        found[part.name] = part
    return list(found.values())


def check_slurm_request(launcher: dict[str, Any]) -> None:
    """One line, before anything is submitted, for a request no node of the partition can run
    (FEDBENCH_SLURM_PRECHECK=0 skips it, for a cluster whose sinfo does not describe its nodes)."""
    if os.environ.get("FEDBENCH_SLURM_PRECHECK", "1") == "0":
        return
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm: sbatch and sinfo are not on PATH here; launch the sweep from "
                          "a node of the SLURM cluster (or use hydra/launcher=submitit_local)")
    partitions = slurm_partitions()
    wanted = launcher.get("partition")
    part = next((p for p in partitions if p.name == wanted) if wanted else (p for p in partitions if p.default),
                None)
    if part is None:
        names = ", ".join(p.name for p in partitions) or "none"
        what = f"hydra.launcher.partition={wanted}: no such partition" if wanted else \
            "hydra.launcher.partition=null: the cluster has no default partition"
        raise ConfigError(f"{what}; partitions: {names}")
    where = f"partition {part.name}"
    tasks, cpus = int(launcher.get("tasks_per_node") or 1), int(launcher.get("cpus_per_task") or 1)
    if tasks * cpus > part.cpus:
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks} x hydra.launcher.cpus_per_task={cpus} = "
                          f"{tasks * cpus} CPUs per node, but the nodes of {where} have {part.cpus}; lower "
                          f"hydra.launcher.cpus_per_task or hydra.launcher.tasks_per_node")
    mem = launcher.get("mem_gb")
    if mem is not None and float(mem) * 1024 > part.memory_mb:
        raise ConfigError(f"hydra.launcher.mem_gb={mem}: the nodes of {where} have {part.memory_mb / 1024:.1f} GB; "
                          f"lower hydra.launcher.mem_gb")
    gpus = int(launcher.get("gpus_per_node") or 0)
    if gpus > part.gpus:
        raise ConfigError(f"hydra.launcher.gpus_per_node={gpus}: the nodes of {where} have {part.gpus} GPUs; "
                          f"choose another hydra.launcher.partition or lower gpus_per_node")
    nodes = int(launcher.get("nodes") or 1)
    if nodes > part.nodes:
        raise ConfigError(f"hydra.launcher.nodes={nodes}: {where} has {part.nodes} node(s)")
    timeout = launcher.get("timeout_min")
    if timeout is not None and timeout > part.time_limit_min:
        raise ConfigError(f"hydra.launcher.timeout_min={timeout}: {where} allows at most "
                          f"{part.time_limit_min:g} minutes")
