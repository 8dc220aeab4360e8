"""What a run carries from round to round (RunState), and its checkpoint on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedbench.engine.functional import tree_assign
from fedbench.errors import ConfigError
from fedbench.metrics.tracker import BestTracker
from fedbench.tracking.files import write_json

log = logging.getLogger("fedbench")

# keys that do not change what a run computes (ignored when matching a checkpoint to a config)
_NON_SEMANTIC = ("resume", "logger", "progress", "output_root", "checkpoint_every", "hydra")


@dataclass
class RunState:
    """Everything that changes as rounds go by; a checkpoint is exactly this."""

    round: int = 0                                  # rounds done
    gstate: dict[str, Any] = field(default_factory=dict)   # the server's state (method-defined tree)
    cstates: dict[str, Any] = field(default_factory=dict)  # per-client state, every leaf stacked [N, ...]
    totals: dict[str, Any] = field(default_factory=lambda: {"bytes_up": 0, "bytes_down": 0, "samples": 0,
                                                            "time_s": 0.0})
    best: BestTracker = field(default_factory=BestTracker)           # on global validation
    best_personal: BestTracker = field(default_factory=BestTracker)  # on personal/* (clients' own splits)
    last_eval: dict[str, Any] = field(default_factory=dict)          # the last evaluated round's row
    wandb_id: str | None = None

    def advance(self, round_: int, cohort: torch.Tensor, gstate: dict[str, Any], client_states: dict[str, Any],
                bytes_up: int, bytes_down: int, samples: int, seconds: float) -> RunState:
        """The state after round `round_`: the new server state, the cohort's client states, totals."""
        tree_assign(self.cstates, cohort, client_states)
        self.round, self.gstate = round_, gstate
        t = self.totals
        t["bytes_up"] += bytes_up
        t["bytes_down"] += bytes_down
        t["samples"] += samples
        t["time_s"] += seconds
        t["rounds_done"] = round_
        return self

    def to_checkpoint(self, fp: str, finished: bool) -> dict[str, Any]:
        return {"round": self.round, "gstate": self.gstate, "cstates": self.cstates,
                "tracker": self.best.state_dict(), "ptracker": self.best_personal.state_dict(),
                "totals": self.totals, "fingerprint": fp, "wandb_id": self.wandb_id, "finished": finished,
                "last_eval": self.last_eval}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], target: float | None) -> RunState:
        state = cls(round=int(ckpt["round"]), gstate=ckpt["gstate"], cstates=ckpt["cstates"],
                    totals=dict(ckpt["totals"]), last_eval=dict(ckpt.get("last_eval", {})),
                    wandb_id=ckpt.get("wandb_id"))
        state.best, state.best_personal = BestTracker(target=target), BestTracker(target=target)
        state.best.load_state_dict(ckpt["tracker"])
        state.best_personal.load_state_dict(ckpt.get("ptracker", {}))
        return state


def semantic_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain values without the keys that do not change what a run computes."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for k in _NON_SEMANTIC:
        data.pop(k, None)
    data.get("hardware", {}).pop("threads", None)
    return data


def fingerprint(cfg: DictConfig) -> str:
    data = semantic_config(cfg)
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """Atomic: written to a temporary file, flushed, then renamed; the one it replaces is kept as
    checkpoint.prev.pt, so a file torn by a crash never leaves the run without a checkpoint."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    write_json(path.with_name("run_state.json"), {k: ckpt[k] for k in ("round", "fingerprint", "finished")})


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The newest readable checkpoint (tensors, numbers, strings, lists and dicts only: weights_only).
    A corrupt or truncated newest file falls back to the previous one with a warning; when both are
    unreadable the run stops with one line (ConfigError)."""
    errors = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            ckpt = torch.load(candidate, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
            errors.append(f"{candidate.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"[:160])
            continue
        if errors:
            log.warning("checkpoint %s is unreadable (%s); resuming from %s", path, errors[0], candidate.name)
        return ckpt
    raise ConfigError(f"resume: no readable checkpoint in {path.parent} ({'; '.join(errors)}); "
                      f"use resume=false to start over")


def find_resumable(root: Path, fp: str, exclude: Path) -> Path | None:
    """The newest unfinished run dir under `root` whose checkpoint was written by the same config."""
    best: tuple[float, Path] | None = None
    for state_file in root.glob("**/run_state.json"):
        try:
            st = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if st.get("fingerprint") == fp and not st.get("finished") and state_file.parent != exclude:
            mtime = state_file.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, state_file.parent)
    return best[1] if best else None
