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
from torch.utils._pytree import tree_leaves, tree_map

from fedbench.engine.functional import tree_assign, tree_index, tree_is_empty
from fedbench.errors import ConfigError
from fedbench.registry import table
from fedbench.tracking.files import write_json

log = logging.getLogger("fedbench")

# keys that do not change what a run computes (ignored when matching a checkpoint to a config)
_NON_SEMANTIC = ("resume", "logger", "progress", "output_root", "checkpoint_every", "checkpoint_inline_mb",
                 "hydra")
CLIENT_DIR = "client_state"     # per-client state of a large federation, in blocks of clients
BLOCK_CLIENTS = 64


@dataclass
class RunState:
    """Everything that changes as rounds go by; a checkpoint is exactly this."""

    round: int = 0                                  # rounds done
    gstate: dict[str, Any] = field(default_factory=dict)   # the server's state (method-defined tree)
    cstates: dict[str, Any] = field(default_factory=dict)  # per-client state, every leaf stacked [N, ...]
    totals: dict[str, Any] = field(default_factory=lambda: {"bytes_up": 0, "bytes_down": 0, "samples": 0,
                                                            "time_s": 0.0})
    last: dict[str, Any] = field(default_factory=dict)       # every metric's last value (the summary's)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)  # each callback's state_dict
    # clients whose state changed since the last checkpoint (None: all; not saved)
    dirty: set[int] | None = field(default=None, repr=False)

    def advance(self, round_: int, cohort: torch.Tensor, gstate: dict[str, Any], client_states: dict[str, Any],
                bytes_up: int, bytes_down: int, samples: int, seconds: float, client_steps: int = 0) -> RunState:
        """The state after round `round_`: the new server state, the cohort's client states, totals."""
        tree_assign(self.cstates, cohort, client_states)
        if self.dirty is not None and not tree_is_empty(client_states):
            self.dirty.update(int(c) for c in cohort.tolist())
        self.round, self.gstate = round_, gstate
        t = self.totals
        t["bytes_up"] += bytes_up
        t["bytes_down"] += bytes_down
        t["samples"] += samples
        t["client_steps"] = t.get("client_steps", 0) + client_steps  # .get: checkpoints from before it
        t["time_s"] += seconds
        t["rounds_done"] = round_
        return self

    def to_checkpoint(self, fp: str, finished: bool) -> dict[str, Any]:
        return {"round": self.round, "gstate": self.gstate, "cstates": self.cstates, "totals": self.totals,
                "fingerprint": fp, "finished": finished, "last": self.last, "callbacks": self.callbacks}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> RunState:
        callbacks = dict(ckpt.get("callbacks") or _callbacks_of_v1(ckpt))
        # client blocks on disk are exactly this state: none needs writing again
        return cls(round=int(ckpt["round"]), gstate=ckpt["gstate"], cstates=ckpt["cstates"],
                   totals=dict(ckpt["totals"]), last=dict(ckpt.get("last", ckpt.get("last_eval", {}))),
                   callbacks=callbacks, dirty=set() if ckpt.get("client_blocks") else None)


class ClientBlocks:
    """Per-client state of a large federation outside checkpoint.pt: `client_state/` holds one file per
    block of BLOCK_CLIENTS clients, named by the round it was written in, and the checkpoint lists the
    file of every block. A checkpoint rewrites only the blocks with a client that trained since the
    previous one (SCAFFOLD at N = 1000, 10 per round, every 5 rounds: at most 50 of 1000 clients'
    control variates instead of all of them). Files are written before the checkpoint that names them
    and removed only when neither it nor the previous checkpoint (checkpoint.prev.pt) names them, so a
    crash at any point leaves both checkpoints readable and exact."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / CLIENT_DIR

    def save(self, state: RunState, previous: dict[int, str] | None) -> dict[int, str]:
        """Write the dirty blocks; returns the manifest block -> file name of this state."""
        n = _num_clients(state.cstates)
        self.dir.mkdir(exist_ok=True)
        manifest = dict(previous or {})
        blocks = range((n + BLOCK_CLIENTS - 1) // BLOCK_CLIENTS)
        dirty = set(blocks) if state.dirty is None or previous is None else \
            {c // BLOCK_CLIENTS for c in state.dirty} | (set(blocks) - set(manifest))
        for b in sorted(dirty):
            rows = slice(b * BLOCK_CLIENTS, min((b + 1) * BLOCK_CLIENTS, n))
            name = f"block{b:05d}-r{state.round:06d}.pt"
            tmp = self.dir / (name + ".tmp")
            with open(tmp, "wb") as f:
                # clones: a saved view would write its whole storage (every client)
                torch.save(tree_map(torch.clone, tree_index(state.cstates, rows)), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
            manifest[b] = name
        state.dirty = set()
        return manifest

    def prune(self, keep: list[dict[int, str]]) -> None:
        """Remove the block files no kept manifest names."""
        named = {name for m in keep for name in m.values()}
        for f in self.dir.glob("block*.pt"):
            if f.name not in named:
                f.unlink(missing_ok=True)

    def load(self, manifest: dict[int, str], device: torch.device) -> dict[str, Any]:
        parts = [torch.load(self.dir / manifest[b], map_location=device, weights_only=True)
                 for b in sorted(manifest)]
        return tree_map(lambda *rows: torch.cat(rows), *parts)


def _num_clients(cstates: dict[str, Any]) -> int:
    leaves = tree_leaves(cstates)
    return int(leaves[0].shape[0]) if leaves else 0


def state_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def _callbacks_of_v1(ckpt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Callback states of a checkpoint written before callbacks kept their own (trackers, W&B id)."""
    return {"evaluation": {"best": ckpt.get("tracker", {}), "best_personal": ckpt.get("ptracker", {})},
            "wandb": {"run_id": ckpt.get("wandb_id")}}


def semantic_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain values without the keys that do not change what a run computes."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for k in _NON_SEMANTIC:
        data.pop(k, None)
    extra = data.pop("callbacks", None) or {}
    sinks = {n for n, cls in table("callback").items() if cls.stage == "sink"}
    if any(k not in sinks for k in extra):  # a callback that may end a run early changes its result
        data["callbacks"] = {k: v for k, v in extra.items() if k not in sinks}
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
        if ckpt.get("client_blocks"):  # client state in client_state/ blocks
            try:
                ckpt["cstates"] = ClientBlocks(path.parent).load(
                    {int(b): n for b, n in ckpt["client_blocks"].items()}, device)
            except Exception as e:  # noqa: BLE001 - a missing or torn block: try the previous checkpoint
                errors.append(f"{candidate.name}: client_state block unreadable ({type(e).__name__})")
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
