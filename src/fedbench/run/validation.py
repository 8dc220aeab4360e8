"""Checks of run-level values before any work: each failure is one line naming the key and what is allowed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedbench.config import MethodConfig, build_config
from fedbench.errors import ConfigError
from fedbench.registry import lookup
from fedbench.tracking.wandb_logger import MODES

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
EXECUTORS = ("sequential", "batched", "auto")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    v = OmegaConf.select(cfg, key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{key}={v}: must be an integer >= {minimum}")


def method_config(cfg: DictConfig) -> tuple[Any, MethodConfig]:
    """(method class, its typed config) from `cfg.method`; unknown keys and wrong types are one line."""
    method_cls = lookup("method", str(cfg.method.name))
    values = OmegaConf.to_container(cfg.method, resolve=True)
    return method_cls, build_config(method_cls.Config, values)


def _number(cfg: DictConfig, key: str, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False, optional: bool = False) -> None:
    """`key` is a finite number in the interval (brackets per the flags), or null when optional."""
    v = OmegaConf.select(cfg, key)
    if v is None and optional:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={v}: must be a number in {interval}{' or null' if optional else ''}")


def _check_inputs(cfg: DictConfig, uses_backbone: bool) -> None:
    """The backbone takes what the dataset gives (frozen features are vectors); methods with their own
    model (AFL, DeepAFL) build no backbone."""
    features = str(OmegaConf.select(cfg, "features.extractor", default="none"))
    if features != "none":
        lookup("backbone", features, key="features.extractor")
        if str(cfg.dataset.get("input", "image")) != "image":
            raise ConfigError(f"features.extractor={features}: needs an image dataset; dataset={cfg.dataset.name} "
                              f"has {cfg.dataset.input} inputs (features.extractor=none)")
    given = "vector" if features != "none" else str(cfg.dataset.get("input", "image"))
    if uses_backbone and given == "vector" and str(cfg.backbone.get("input", "any")) == "image":
        raise ConfigError(f"backbone={cfg.backbone.name} takes images but dataset={cfg.dataset.name} gives vector "
                          f"inputs{' (frozen features)' if features != 'none' else ''}; use backbone=logreg or "
                          f"backbone=mlp")
    weights = cfg.backbone.get("weights")
    if isinstance(weights, str) and ("/" in weights or weights.endswith((".pt", ".pth"))) \
            and not Path(weights).exists():
        raise ConfigError(f"backbone.weights={weights}: no such file (a state dict, imagenet or none)")
    source = OmegaConf.select(cfg, "warm_start.source")
    if source:
        lookup("dataset", str(source), key="warm_start.source")


def _check_data(cfg: DictConfig) -> None:
    _number(cfg, "dataset.val_fraction", 0.0, 1.0, high_open=True, optional=True)
    _number(cfg, "dataset.test_fraction", 0.0, 1.0, high_open=True, optional=True)
    fractions = sum(float(cfg.dataset.get(k) or 0.0) for k in ("val_fraction", "test_fraction"))
    if fractions >= 1.0:
        raise ConfigError(f"dataset.val_fraction + dataset.test_fraction = {fractions:g}: must leave training "
                          f"data (< 1)")
    if cfg.partition.name == "shards":
        _positive_int(cfg, "partition.shards_per_client")


def validate(cfg: DictConfig, check_device: bool = True) -> None:
    """Check values before any work; each failure is one line naming the key and what is allowed.
    `check_device=False` leaves the device to the job (a SLURM sweep is launched from a login node
    that may have no GPU)."""
    for kind in ("method", "backbone", "dataset", "partition"):
        lookup(kind, str(cfg[kind].name))
    method_cls, _ = method_config(cfg)
    for key in ("rounds", "clients", "batch_size", "local_epochs", "eval_every", "checkpoint_every"):
        _positive_int(cfg, key)
    _positive_int(cfg, "seed", minimum=0)
    if cfg.hardware.get("threads") is not None:
        _positive_int(cfg, "hardware.threads")
    if cfg.local_steps is not None:
        _positive_int(cfg, "local_steps")
    p = cfg.participation
    if not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ConfigError(f"participation={p}: must be a fraction in (0, 1]")
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not 0 < cfg.lr < math.inf:
        raise ConfigError(f"lr={cfg.lr}: must be a finite number > 0")
    _number(cfg, "metrics.target", 0.0, 1.0, low_open=True, optional=True)
    if cfg.partition.name == "dirichlet":
        a = cfg.partition.alpha
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not a > 0:
            raise ConfigError(f"partition.alpha={a}: must be a float > 0 (small alpha = more label skew)")
    if str(cfg.hardware.dtype) not in DTYPES:
        raise ConfigError(f"hardware.dtype={cfg.hardware.dtype}: allowed: {', '.join(DTYPES)}")
    if str(cfg.hardware.get("auto_policy", "heuristic")) not in ("heuristic", "timed"):
        raise ConfigError(f"hardware.auto_policy={cfg.hardware.auto_policy}: allowed: heuristic, timed")
    if str(cfg.hardware.get("memory_format", "auto")) not in ("auto", "channels_last", "contiguous"):
        raise ConfigError(f"hardware.memory_format={cfg.hardware.memory_format}: "
                          "allowed: auto, channels_last, contiguous")
    if str(cfg.hardware.executor) not in EXECUTORS:
        raise ConfigError(f"hardware.executor={cfg.hardware.executor}: allowed: {', '.join(EXECUTORS)}")
    if str(cfg.logger.wandb.mode) not in MODES:
        raise ConfigError(f"logger.wandb.mode={cfg.logger.wandb.mode}: allowed: {', '.join(MODES)}")
    if cfg.resume not in (True, False, "auto"):
        raise ConfigError(f"resume={cfg.resume}: allowed: auto, true, false")
    _check_data(cfg)
    _check_inputs(cfg, method_cls.uses_backbone)
    if check_device:
        resolve_device(str(cfg.hardware.device))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"hardware.device={name}: CUDA is not available on this machine; "
                              f"use hardware=cpu or hardware=auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"hardware.device={name}: allowed: auto, cpu, cuda, cuda:N")
