"""Warm starts: pretrain a backbone centrally on a SOURCE dataset that differs from the federated
target (e.g. sklearn digits upsampled to 28x28 -> mnist5k), cache the checkpoint, record provenance.

The body's weights are transferred; the head is new (target classes), as in fine-tuning from ImageNet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from fedbench.data.datasets import cache_dir
from fedbench.errors import ConfigError
from fedbench.models.backbones import build_model
from fedbench.registry import lookup

log = logging.getLogger("fedbench")


def _fit_shape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Source images resized (bilinear) and channel-matched to the target input shape."""
    if x.dim() != 4 or len(shape) != 3:
        raise ConfigError("warm_start needs image datasets on both sides")
    if x.shape[1] != shape[0]:
        x = x.mean(1, keepdim=True).expand(-1, shape[0], -1, -1)
    if tuple(x.shape[-2:]) != tuple(shape[-2:]):
        x = F.interpolate(x, size=shape[-2:], mode="bilinear", align_corners=False)
    return x.contiguous()


def train_central(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
                  seed: int) -> None:
    """Plain centralised SGD (momentum 0.9) with cross-entropy, seeded minibatch order."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    net.train()
    with torch.enable_grad():  # callers may be inside no_grad (e.g. frozen-feature extraction)
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g).to(y.device)
            for i in range(0, len(y), batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()


def calibrate(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, epochs: int, fraction: float,
              lr: float, batch_size: int, seed: int) -> dict[str, Any]:
    """FedSQ's optional central calibration: fine-tune the (warm-started) model for `epochs` on a
    server-held sample of `fraction` of the pooled training data before the structural copy is frozen.
    Returns its provenance (`calibration.*`)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"method.calibration_fraction={fraction}: must be in (0, 1]")
    n = max(1, round(fraction * len(y_train)))
    g = torch.Generator().manual_seed(seed + 7919)  # its own stream: does not shift the run's other draws
    idx = torch.randperm(len(y_train), generator=g)[:n].to(y_train.device)
    was = model.training
    train_central(model, x_train[idx], y_train[idx], epochs, lr, batch_size, seed)
    model.train(was)
    return {"calibration.epochs": epochs, "calibration.samples": n, "calibration.fraction": fraction,
            "calibration.lr": lr}


def pretrain(backbone_cfg: Any, ws: Any, input_shape: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict of the pretrained backbone, provenance). Cached under $FEDBENCH_CACHE."""
    spec = {"backbone": OmegaConf.to_container(backbone_cfg, resolve=True), "source": str(ws.source),
            "epochs": int(ws.epochs), "lr": float(ws.lr), "batch_size": int(ws.batch_size), "seed": int(ws.seed),
            "input_shape": list(input_shape)}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"warmstart-{spec['source']}-{key}.pt"
    provenance = {**{f"warm_start.{k}": v for k, v in spec.items() if k != "backbone"},
                  "warm_start.checkpoint": str(path)}
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            provenance["warm_start.source_val_acc"] = float(blob["source_val_acc"])
            return blob["state_dict"], provenance
        except Exception as e:  # noqa: BLE001 - a torn or foreign cache file: pretrain again
            log.warning("warm start cache %s is unreadable (%s); pretraining again", path,
                        str(e).splitlines()[0][:80] if str(e) else type(e).__name__)
    src_cfg = OmegaConf.create({"name": spec["source"], "val_fraction": 0.1, "test_fraction": 0.0, "split_seed": 0})
    src = lookup("dataset", spec["source"])(src_cfg)
    x, y = _fit_shape(src.x_train.float(), input_shape), src.y_train
    xv, yv = _fit_shape(src.x_val.float(), input_shape), src.y_val
    torch.manual_seed(spec["seed"])
    net = build_model(backbone_cfg, input_shape, src.num_classes)
    train_central(net, x, y, spec["epochs"], spec["lr"], spec["batch_size"], spec["seed"])
    net.eval()
    with torch.no_grad():
        acc = float((net(xv).argmax(1) == yv).float().mean()) if len(yv) else float("nan")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"state_dict": net.state_dict(), "source_val_acc": acc, "spec": spec}, tmp)
    os.replace(tmp, path)
    log.info("warm start: pretrained %s on %s for %d epochs (source val acc %.3f) -> %s",
             backbone_cfg.name, spec["source"], spec["epochs"], acc, path)
    provenance["warm_start.source_val_acc"] = acc
    return net.state_dict(), provenance


def apply_warm_start(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy the body's weights (everything but the head) into `model`; returns how many tensors."""
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("head.") and k in own and own[k].shape == v.shape}
    if not body:
        raise ConfigError("warm_start: the pretrained checkpoint shares no body weights with this backbone")
    model.load_state_dict(body, strict=False)
    return len(body)
