"""Frozen features: every split's inputs mapped once through the frozen body of a backbone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedbench.config import build_config
from fedbench.errors import ConfigError
from fedbench.models.backbones import build_model
from fedbench.models.warmstart import apply_warm_start, pretrain
from fedbench.settings import FeaturesConfig

log = logging.getLogger("fedbench")


def features_config(cfg: DictConfig) -> FeaturesConfig:
    """The run's typed `features` group (its defaults where a config has none)."""
    node = OmegaConf.select(cfg, "features")
    values = {} if node is None else OmegaConf.to_container(node, resolve=True)
    return build_config(FeaturesConfig, values, prefix="features", owner="features")


def extractor_config(fcfg: FeaturesConfig) -> DictConfig:
    """The backbone config of the frozen extractor `features.extractor` (its resolution, if set)."""
    extra = {"resolution": fcfg.resolution} if fcfg.resolution is not None else {}
    return OmegaConf.create({"name": fcfg.extractor, **extra})


@torch.no_grad()
def extract_features(cfg: DictConfig, dataset: Any) -> dict[str, Any] | None:
    """Replace every split's inputs by the features of a frozen backbone body, computed once.

    `features.extractor=none` keeps the raw inputs. The extractor's weights come from
    `features.weights` (a state dict of the whole backbone) or its random init seeded by `features.seed`."""
    fcfg = features_config(cfg)
    if fcfg.extractor == "none":
        return None
    name = fcfg.extractor
    torch.manual_seed(fcfg.seed)
    net = build_model(extractor_config(fcfg), dataset.input_shape, dataset.num_classes)
    source = "random init (seed)"
    if fcfg.weights == "warm_start":  # the backbone pretrained centrally on warm_start.source
        state, provenance = pretrain(extractor_config(fcfg), cfg.warm_start, dataset.input_shape)
        apply_warm_start(net, state)
        source = f"warm start on {cfg.warm_start.source} ({provenance['warm_start.checkpoint']})"
    elif fcfg.weights:
        path = Path(fcfg.weights)
        if not path.exists():
            raise ConfigError(f"features.weights={path}: no such file")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        source = str(path)
    body = net.body.to(device=dataset.x_train.device, dtype=dataset.x_train.dtype).eval()
    batch = fcfg.batch
    for split in ("train", "val", "test"):
        x = getattr(dataset, f"x_{split}")
        setattr(dataset, f"x_{split}", torch.cat([body(x[i:i + batch]) for i in range(0, len(x), batch)])
                if len(x) else x)
    info = {"extractor": name, "weights": source, "dim": int(dataset.x_train.shape[1])}
    log.info("frozen features: %s (%s), %d dims", name, source, info["dim"])
    return info
