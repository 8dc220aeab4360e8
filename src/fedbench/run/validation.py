"""Checks of every value before any work: each failure is one line naming the key and what is allowed.

`validate(cfg)` builds the typed config of every group (fedbench.config / fedbench.settings and the
classes registered with each dataset, partition and backbone), then checks what spans several groups.
What needs the data (a partition that cannot be drawn, a backbone that cannot take the inputs, a method
whose set-up refuses the model) is checked by `fedbench.run.build.dry_build`, also before any work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedbench.config import GroupConfig, MethodConfig, build_config
from fedbench.data.federation import DropoutConfig, StragglerConfig, departure
from fedbench.engine.optim import LrSchedule
from fedbench.errors import ConfigError
from fedbench.registry import config_class, lookup
from fedbench.run.callbacks import check_callbacks
from fedbench.settings import (
    FeaturesConfig,
    HardwareConfig,
    MetricsConfig,
    RunSettings,
    WandbConfig,
    WarmStartConfig,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
GROUPS_WITH_CHOICES = ("dataset", "partition", "availability", "backbone")


def values_of(node: Any, key: str) -> dict[str, Any]:
    """A group's composed values as plain Python; a mandatory value left unset (`???`) is one line."""
    values = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    for k, v in values.items():
        if v == "???":
            raise ConfigError(f"{key}.{k}: required, it has no default; set it, e.g. {key}.{k}=VALUE")
    return values


def method_config(cfg: DictConfig) -> tuple[Any, MethodConfig]:
    """(method class, its typed config) from `cfg.method`; unknown keys and wrong types are one line."""
    method_cls = lookup("method", str(cfg.method.name))
    return method_cls, build_config(method_cls.Config, values_of(cfg.method, "method"))


def typed_group(cfg: DictConfig, key: str, config_cls: type[GroupConfig]) -> Any:
    node = OmegaConf.select(cfg, key)
    if node is None or not OmegaConf.is_dict(node):
        raise ConfigError(f"{key}: must be a group of keys ({', '.join(config_cls.__dataclass_fields__)})")
    return build_config(config_cls, values_of(node, key), prefix=key, owner=key)


def check_groups(cfg: DictConfig) -> MethodConfig:
    """Every key of every group: known, of its type, in its range. Returns the method's typed config."""
    top = {k: OmegaConf.select(cfg, k) for k in RunSettings.__dataclass_fields__ if k in cfg}
    build_config(RunSettings, top, prefix="")
    for kind in GROUPS_WITH_CHOICES:
        name = str(cfg[kind].name)
        lookup(kind, name)
        config_cls = config_class(kind, name)
        if config_cls is not None:  # a plugin without a typed config is not checked
            build_config(config_cls, values_of(cfg[kind], kind), prefix=kind, owner=f"{kind}={name}")
    _, method_cfg = method_config(cfg)
    typed_group(cfg, "hardware", HardwareConfig)
    extra = sorted(set(cfg.logger) - {"sinks", "wandb"})
    if extra:
        raise ConfigError(f"logger.{extra[0]}: unknown key; allowed: sinks, wandb")
    if "wandb" in cfg.logger:
        typed_group(cfg, "logger.wandb", WandbConfig)
    check_callbacks(cfg)
    for key, config_cls in (("dropout", DropoutConfig), ("straggler", StragglerConfig),
                            ("warm_start", WarmStartConfig), ("features", FeaturesConfig),
                            ("metrics", MetricsConfig), ("lr_schedule", LrSchedule)):
        if key in cfg:
            typed_group(cfg, key, config_cls)
    return method_cfg


def _check_inputs(cfg: DictConfig, uses_backbone: bool) -> None:
    """The backbone takes what the dataset gives (frozen features are vectors); methods with their own
    model (AFL, DeepAFL) build no backbone."""
    features = str(OmegaConf.select(cfg, "features.extractor", default="none"))
    if features != "none":
        lookup("backbone", features, key="features.extractor")
        if str(cfg.dataset.get("input", "image")) != "image":
            raise ConfigError(f"features.extractor={features}: needs an image dataset; dataset={cfg.dataset.name} "
                              f"has {cfg.dataset.input} inputs (features.extractor=none)")
        weights = OmegaConf.select(cfg, "features.weights")
        if weights == "warm_start" and not OmegaConf.select(cfg, "warm_start.source"):
            raise ConfigError("features.weights=warm_start: needs warm_start.source (the dataset to pretrain on)")
        if weights not in (None, "warm_start") and not Path(str(weights)).is_file():
            raise ConfigError(f"features.weights={weights}: no such file (a state dict of the extractor, "
                              f"warm_start or null)")
    given = "vector" if features != "none" else str(cfg.dataset.get("input", "image"))
    if uses_backbone and given == "vector" and str(cfg.backbone.get("input", "any")) == "image":
        raise ConfigError(f"backbone={cfg.backbone.name} takes images but dataset={cfg.dataset.name} gives vector "
                          f"inputs{' (frozen features)' if features != 'none' else ''}; use backbone=logreg or "
                          f"backbone=mlp")
    source = OmegaConf.select(cfg, "warm_start.source")
    if source:
        lookup("dataset", str(source), key="warm_start.source")
        source_cls = config_class("dataset", str(source))
        kinds = {str(cfg.dataset.get("input", "image")),
                 source_cls.__dataclass_fields__["input"].default if source_cls is not None else "image"}
        if kinds != {"image"}:
            raise ConfigError(f"warm_start.source={source}: a warm start needs image datasets on both sides "
                              f"(dataset={cfg.dataset.name})")


def _check_scored(cfg: DictConfig, method_cls: Any) -> None:
    """A method without a global model is scored on the clients' own local splits: a partition without
    them would leave the run with no accuracy at all."""
    local = float(cfg.partition.get("client_test_fraction") or 0) + float(cfg.partition.get("client_val_fraction")
                                                                         or 0)
    if not method_cls.has_global_model and local == 0:
        raise ConfigError(f"method={cfg.method.name} has no global model, so it is scored on each client's own "
                          f"test split, and partition={cfg.partition.name} gives clients none: nothing would be "
                          f"measured; use partition=noniid_s or set partition.client_test_fraction=0.2 "
                          f"(and partition.client_val_fraction=0.1 for model selection)")


def _check_workers(cfg: DictConfig, device: torch.device) -> None:
    """hardware.workers processes on this machine: at most one per core on a CPU."""
    workers = int(cfg.hardware.workers)
    cores = os.cpu_count() or 1
    if device.type == "cpu" and workers > cores:
        raise ConfigError(f"hardware.workers={workers}: this machine has {cores} cores; use at most {cores} "
                          f"(each worker process needs a core)")


def validate(cfg: DictConfig, check_device: bool = True) -> None:
    """Check values before any work; each failure is one line naming the key and what is allowed.
    `check_device=False` leaves the device to the job (a SLURM sweep is launched from a login node
    that may have no GPU)."""
    from fedbench.methods.base import RunSpec

    method_cfg = check_groups(cfg)
    method_cls = lookup("method", str(cfg.method.name))
    _check_inputs(cfg, method_cls.uses_backbone)
    _check_scored(cfg, method_cls)
    method_cls(method_cfg).check_run(RunSpec(int(cfg.rounds), float(cfg.participation), int(cfg.local_epochs),
                                             cfg.local_steps, departure(cfg)))
    if check_device:
        _check_workers(cfg, resolve_device(str(cfg.hardware.device)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"hardware.device={name}: CUDA is not available on this machine; "
                              f"use hardware=cpu or hardware=auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"hardware.device={name}: this machine has {torch.cuda.device_count()} GPU(s); "
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"hardware.device={name}: allowed: auto, cpu, cuda, cuda:N")
