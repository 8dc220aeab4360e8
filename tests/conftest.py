"""Shared helpers: compose real Hydra configs, run the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

# A run that finishes in about a second on a CPU: real digits data, logistic regression.
TINY = ["dataset=digits", "backbone=logreg", "clients=10", "rounds=2", "participation=0.5",
        "batch_size=16", "logger=local", "progress=false", "hardware=cpu", "checkpoint_every=1"]


PLUGINS = Path(__file__).parent / "plugins"
# the test-only plugin methods (tests/plugins): environment + the override that finds their YAML
PLUGIN_ENV = {"PYTHONPATH": str(PLUGINS), "FEDBENCH_PLUGINS": "fedbench_test_methods"}
PLUGIN_CONF = f"hydra.searchpath=[file://{PLUGINS / 'conf'}]"


def compose_cfg(overrides: list[str]):
    with initialize_config_module(config_module="fedbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_cli(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fedbench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def make_method(method_cls, hp: dict | None = None, *, model=None, params=None, buffers=None,
                task: str = "classification", num_classes: int = 10, total_rounds: int = 1, lr: float = 0.1,
                label_counts=None, in_features: int = 0, extractors: str = "method"):
    """A method object set up as a run would do it: typed config from `hp`, then setup(RunContext)."""
    import torch

    from fedbench.config import build_config
    from fedbench.engine.functional import make_loss_fn, split_state
    from fedbench.engine.protocol import RunContext

    method = method_cls(build_config(method_cls.Config, {"name": method_cls.name, **(hp or {})}))
    if model is not None and params is None:
        params, buffers = split_state(model)
    loss_fn = make_loss_fn(model, task) if model is not None else None
    method.setup(RunContext(device=torch.device("cpu"), task=task, num_classes=num_classes, in_features=in_features,
                            total_rounds=total_rounds, lr=lr, model=model, loss_fn=loss_fn, params=params or {},
                            buffers=buffers or {}, label_counts=label_counts, extractors=extractors))
    return method


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("**/summary.json"))


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)
