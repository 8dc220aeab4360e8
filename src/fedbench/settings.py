"""Typed configs of the run-level keys and of the groups that are not a registered choice: the top-level
keys of conf/config.yaml, `hardware`, `logger.wandb`, `warm_start`, `features` and `metrics`. Their
defaults equal the YAML's (a test composes every group and compares); the allowed values sit next to them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedbench.config import GroupConfig, spec
from fedbench.errors import ConfigError

DTYPES = ("float32", "float64", "bfloat16")
EXECUTORS = ("sequential", "batched", "auto")
WANDB_MODES = ("offline", "online", "disabled")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class RunSettings(GroupConfig):
    """The top-level keys of conf/config.yaml (the groups below are checked on their own)."""

    seed: int = spec(0, ge=0)
    rounds: int = spec(30, ge=1)
    clients: int = spec(20, ge=1)
    participation: float = spec(0.5, gt=0, le=1)
    local_epochs: int = spec(1, ge=1)
    local_steps: int | None = spec(None, ge=1)
    batch_size: int = spec(20, ge=1)
    lr: float = spec(0.05, gt=0)
    eval_every: int = spec(1, ge=1)
    resume: bool | str = "auto"
    checkpoint_every: int = spec(5, ge=1)
    checkpoint_inline_mb: float = spec(256, ge=0)
    progress: bool = True
    output_root: str = spec("outputs", nonempty=True)

    def __post_init__(self) -> None:
        if self.resume not in (True, False, "auto"):
            raise ConfigError(f"resume={self.resume}: allowed: auto, true, false")


@dataclass(frozen=True)
class HardwareConfig(GroupConfig):
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    threads: int | None = spec(None, ge=1)
    workers: int = spec(1, ge=1)
    dtype: str = spec("float32", choices=DTYPES)
    executor: str = spec("auto", choices=EXECUTORS)
    chunk_size: int | None = spec(None, ge=1)
    compile: bool = False
    memory_format: str = spec("auto", choices=("auto", "channels_last", "contiguous"))
    auto_policy: str = spec("heuristic", choices=("heuristic", "timed"))
    max_padding: float | None = spec(1.2, ge=1)
    compile_mode: str = spec("default", choices=COMPILE_MODES)
    tf32: bool | None = None
    cudnn_benchmark: bool | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"hardware.device={self.device}: allowed: auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class WandbConfig(GroupConfig):
    mode: str = spec("offline", choices=WANDB_MODES)
    project: str = spec("fedbench", nonempty=True)
    entity: str | None = None
    group: str | None = None              # null: the sweep's group (all runs of a sweep share it)
    tags: tuple[str, ...] = ()
    job_type: str | None = None


@dataclass(frozen=True)
class WarmStartConfig(GroupConfig):
    source: str | None = None             # a dataset name: pretrain the backbone centrally on it first
    epochs: int = spec(5, ge=1)
    lr: float = spec(0.05, gt=0)
    batch_size: int = spec(64, ge=1)
    seed: int = spec(0, ge=0)


@dataclass(frozen=True)
class FeaturesConfig(GroupConfig):
    extractor: str = spec("none", nonempty=True)   # none | a backbone name whose frozen body maps inputs
    weights: str | None = None            # a state dict of the extractor | warm_start | null (seeded init)
    resolution: int | None = spec(None, ge=16)
    seed: int = spec(0, ge=0)
    batch: int = spec(1024, ge=1)         # inputs per forward pass when the features are computed


@dataclass(frozen=True)
class MetricsConfig(GroupConfig):
    target: float | None = spec(0.9, gt=0, le=1)   # rounds_to_target: first round with val metric >= target
    # method: personal/* in each method's convention | both: also personal_global/* and personal_own/*
    # (the global extractor; each client's own after its last round) where a method has both
    extractors: str = spec("method", choices=("method", "both"))

