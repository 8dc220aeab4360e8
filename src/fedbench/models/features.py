"""Frozen features: every split's inputs mapped once through the frozen body of a backbone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedbench.errors import ConfigError
from fedbench.models.backbones import build_model
from fedbench.models.warmstart import apply_warm_start, pretrain

log = logging.getLogger("fedbench")


def extractor_config(fcfg: DictConfig) -> DictConfig:
    """The backbone config of the frozen extractor `features.extractor` (its resolution, if set)."""
    extra = {k: v for k, v in fcfg.items() if k not in ("extractor", "weights", "seed", "batch") and v is not None}
    return OmegaConf.create({"name": str(fcfg.extractor), **extra})


@torch.no_grad()
def extract_features(cfg: DictConfig, dataset: Any, seed: int) -> dict[str, Any] | None:
    """Replace every split's inputs by the features of a frozen backbone body, computed once.

    `features.extractor=none` keeps the raw inputs. The extractor's weights come from
    `features.weights` (a state dict of the whole backbone) or its seeded random init."""
    fcfg = cfg.get("features")
    if fcfg is None or str(fcfg.get("extractor", "none")) == "none":
        return None
    name = str(fcfg.extractor)
    torch.manual_seed(int(fcfg.get("seed", seed)))
    net = build_model(extractor_config(fcfg), dataset.input_shape, dataset.num_classes)
    source = "random init (seed)"
    if str(fcfg.get("weights")) == "warm_start":  # the backbone pretrained centrally on warm_start.source
        state, provenance = pretrain(extractor_config(fcfg), cfg.warm_start, dataset.input_shape)
        apply_warm_start(net, state)
        source = f"warm start on {cfg.warm_start.source} ({provenance['warm_start.checkpoint']})"
    elif fcfg.get("weights"):
        path = Path(str(fcfg.weights))
        if not path.exists():
            raise ConfigError(f"features.weights={path}: no such file")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        source = str(path)
    body = net.body.to(device=dataset.x_train.device, dtype=dataset.x_train.dtype).eval()
    batch = int(fcfg.get("batch", 1024))
    for split in ("train", "val", "test"):
        x = getattr(dataset, f"x_{split}")
        setattr(dataset, f"x_{split}", torch.cat([body(x[i:i + batch]) for i in range(0, len(x), batch)])
                if len(x) else x)
    info = {"extractor": name, "weights": source, "dim": int(dataset.x_train.shape[1])}
    log.info("frozen features: %s (%s), %d dims", name, source, info["dim"])
    return info
