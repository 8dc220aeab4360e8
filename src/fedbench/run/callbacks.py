"""The callback protocol, the list a run's config asks for, and the callbacks that guard a run.

    on_start(run, state)                   before the first round of this process (fresh or resumed)
    after_round(run, state, row) -> (stop, metrics)
                                           after every round: `row` holds the round's metrics so far
                                           (read only); `metrics` are added to it for the callbacks
                                           after this one; stop (True, or the reason as a string)
                                           ends the run after this round
    summary(run, state) -> dict            what the callback adds to summary.json (e.g. best/*)
    on_end(run, state, summary, end)       always, also after an error; `end` says why the run ended
    state_dict() / load_state_dict(d)      what the callback carries across rounds; saved in the
                                           checkpoint, so a resumed run continues it exactly

A callback is one module: a class registered with `@register("callback", NAME, config=Config)`; the
run's config lists it (`fedbench +callbacks=NAME`, `callbacks.NAME.key=value`; `logger.sinks=[NAME]`
for a sink), or a class outside fedbench by `callbacks.NAME._target_=package.module.Class`.
Callbacks run by stage (evaluate, measure, sink, guard), in list order within a stage.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from fedbench.config import GroupConfig, build_config, spec
from fedbench.engine.distributed import SINGLE, World
from fedbench.errors import ConfigError, DivergedError, Preempted
from fedbench.metrics import names
from fedbench.registry import config_class, register, table
from fedbench.run.state import ClientBlocks, previous_path, save_checkpoint, state_bytes

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState

STAGES = ("evaluate", "measure", "sink", "guard")
# every run has these, in this order by stage; `logger.sinks` and `callbacks` add to them
BUILT_IN = ("evaluation", "participation", "progress", "files", "divergence", "checkpoint")


@dataclasses.dataclass(frozen=True)
class RunEnd:
    """Why a run ended: its status, and the callback that ended it early (if one did)."""

    status: str = "completed"  # completed | diverged | preempted | failed | interrupted
    stopped_by: str | None = None  # e.g. early_stop
    reason: str | None = None  # one line


@dataclasses.dataclass(frozen=True)
class NoConfig(GroupConfig):
    """A callback without settings."""


class Callback:
    name: str = ""  # set by @callback(NAME); the config key for a _target_ class
    stage: ClassVar[str] = "measure"  # evaluate | measure | sink | guard
    Config: ClassVar[type[GroupConfig]] = NoConfig

    def __init__(self, config: GroupConfig | None = None):
        self.cfg = config if config is not None else self.Config()

    def on_start(self, run: Run, state: RunState) -> None:
        return None

    def after_round(
        self, run: Run, state: RunState, row: Mapping[str, Any]
    ) -> tuple[bool | str, dict[str, Any]]:
        return False, {}

    def summary(self, run: Run, state: RunState) -> dict[str, Any]:
        return {}

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any], end: RunEnd) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def callback(name: str, config: type[GroupConfig] | None = None) -> Any:
    """Class decorator: register a Callback subclass as `name` (its config class is `Config`)."""

    def deco(cls: type[Callback]) -> type[Callback]:
        cls.name = name
        if config is not None:
            cls.Config = config
        return register("callback", name, config=cls.Config)(cls)

    return deco


class StopFlag:
    """Set (e.g. by a signal handler) to stop at the end of the current round with a checkpoint."""

    requested = False


@callback("divergence")
class DivergenceCallback(Callback):
    """A non-finite training loss stops the run (after the sinks kept the round's metrics)."""

    stage = "guard"

    def after_round(
        self, run: Run, state: RunState, row: Mapping[str, Any]
    ) -> tuple[bool, dict[str, Any]]:
        loss = row.get(names.TRAIN_LOSS, 0.0)
        if not math.isfinite(loss):
            raise DivergedError(
                f"round {state.round}: training loss is {loss}; {divergence_hint(run)}. "
                f"Metrics up to round {state.round} are in {run.run_dir / 'metrics.jsonl'}"
            )
        return False, {}


def divergence_hint(run: Run) -> str:
    """The likely cause of a non-finite loss: the step sizes in play (lowest first), the dtype."""
    method_cfg = run.method.cfg
    steps = [f"lr={run.cfg.lr:g}"] + [
        f"method.{k}={getattr(method_cfg, k):g}"
        for k in run.method.step_size_keys
        if isinstance(getattr(method_cfg, k, None), (int, float))
    ]
    hint = (
        "the steps are too large for this model and data: lower lr first "
        f"(step sizes: {', '.join(steps)})"
    )
    if str(run.cfg.hardware.dtype) == "bfloat16":
        hint += "; or use hardware.dtype=float32 (bfloat16 has 8 bits of mantissa)"
    if float(run.cfg.lr) < 1e-3:
        hint += "; with so small a lr, also check the inputs for non-finite values"
    return hint


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(GroupConfig):
    every: int = spec(5, ge=1)  # set from the run's `checkpoint_every`
    # client state above this size goes to client_state/ blocks (set from `checkpoint_inline_mb`)
    inline_mb: float = spec(256.0, ge=0)


@callback("checkpoint", CheckpointConfig)
class CheckpointCallback(Callback):
    """checkpoint.pt every `checkpoint_every` rounds and at the end (also an early end a callback
    asked for: the same command then finds a finished run); on a stop request (SIGTERM) or
    `stop_after` it writes one and raises Preempted, so the same command resumes exactly."""

    stage = "guard"

    def __init__(
        self,
        config: CheckpointConfig | None = None,
        stop_after: int | None = None,
        world: World = SINGLE,
    ):
        super().__init__(config)
        self.every, self.stop_after, self.world = self.cfg.every, stop_after, world

    def save(self, run: Run, state: RunState, finished: bool) -> None:
        if not self.world.is_main:  # one writer; every rank decides the same way
            return
        ckpt = state.to_checkpoint(run.fingerprint, finished=finished)
        if self.blocks is None and state_bytes(state.cstates) > self.cfg.inline_mb * 2**20:
            self.blocks = ClientBlocks(run.ckpt_path.parent)
            self.manifest = self.loaded_manifest
        if self.blocks is not None:  # a large federation: only the blocks of clients that trained
            before = self.manifest
            self.manifest = self.blocks.save(state, before)
            ckpt = {**ckpt, "cstates": {}, "client_blocks": self.manifest}
        save_checkpoint(run.ckpt_path, ckpt)
        if self.blocks is not None:
            self.blocks.prune([self.manifest] + ([before] if before else []))

    def on_start(self, run: Run, state: RunState) -> None:
        self.blocks, self.manifest, self.loaded_manifest = None, None, None
        if state.dirty is not None:  # resumed from blocks: they hold this state already
            self.loaded_manifest = _manifest_of(run.ckpt_path)

    def after_round(
        self, run: Run, state: RunState, row: Mapping[str, Any]
    ) -> tuple[bool, dict[str, Any]]:
        r, last = state.round, run.rounds
        stop = self.world.any(
            StopFlag.requested
        )  # a signal seen by any rank stops all at this round
        if r == last:
            self.save(run, state, finished=True)
        elif stop or (self.stop_after is not None and r >= self.stop_after):
            self.save(run, state, finished=False)
            raise Preempted(f"stopped after round {r}; checkpoint in {run.ckpt_path}")
        elif r % self.every == 0:
            self.save(run, state, finished=False)
        return False, {}

    def on_end(self, run: Run, state: RunState, summary: dict[str, Any], end: RunEnd) -> None:
        if end.stopped_by is not None and state.round < run.rounds:
            self.save(run, state, finished=True)


def checkpoint_config(cfg: DictConfig) -> CheckpointConfig:
    return CheckpointConfig(int(cfg.checkpoint_every),
                            float(OmegaConf.select(cfg, "checkpoint_inline_mb", default=256.0)))


def _manifest_of(path: Path) -> dict[int, str] | None:
    """The client-block manifest of the checkpoint a resumed run started from."""
    import torch

    for candidate in (path, previous_path(path)):
        try:
            blocks = torch.load(candidate, map_location="cpu", weights_only=True).get("client_blocks")
        except Exception:  # noqa: BLE001 - unreadable: the other one
            continue
        return {int(b): n for b, n in blocks.items()} if blocks else None
    return None


def _select(cfg: DictConfig, key: str) -> dict[str, Any]:
    node = OmegaConf.select(cfg, key)
    if node is None:
        return {}
    if not OmegaConf.is_dict(node):
        raise ConfigError(
            f"{key}={node}: must be a group of keys, e.g. {key}.patience=5 (or +callbacks=NAME)"
        )
    return OmegaConf.to_container(node, resolve=True)


def _external(key: str, values: dict[str, Any]) -> Callback:
    """A callback class outside fedbench, named by `_target_` (module.Class), built with the other
    keys; its state in the checkpoint is kept under its config name."""
    target = str(values.pop("_target_"))
    module_name, _, cls_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}._target_={target}: cannot be imported ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ConfigError(
            f"{key}._target_={target}: must be a subclass of fedbench.run.callbacks.Callback"
        )
    try:
        instance = cls(**values)
    except TypeError as e:
        raise ConfigError(f"{key}: {target} does not take these keys ({e})") from None
    instance.name = key.rsplit(".", 1)[-1]
    return instance


def requested(cfg: DictConfig) -> list[tuple[str, str]]:
    """[(name, config key)] of the callbacks a config adds to the built-in ones: the logger's sinks,
    then `callbacks` in order."""
    sinks = OmegaConf.select(cfg, "logger.sinks", default=None)
    if sinks is None:
        sinks = []
    if isinstance(sinks, str) or not OmegaConf.is_list(sinks) and not isinstance(sinks, list):
        raise ConfigError(
            f"logger.sinks={sinks}: must be a list of sink names, e.g. logger.sinks=[wandb,csv]"
        )
    out = [(str(s), f"logger.{s}") for s in sinks]
    extra = _select(cfg, "callbacks") if "callbacks" in cfg else {}
    out += [(str(k), f"callbacks.{k}") for k in extra]
    return out


def check_callbacks(cfg: DictConfig) -> None:
    """Every requested callback known (or importable) and its keys typed; one line otherwise."""
    known = table("callback")
    seen = set()
    for name, key in requested(cfg):
        if name in seen or name in BUILT_IN:
            raise ConfigError(
                f"{key}: {name} is {'built in' if name in BUILT_IN else 'listed twice'}; "
                f"list each callback once (built in: {', '.join(BUILT_IN)})"
            )
        seen.add(name)
        values = _select(cfg, key)
        if "_target_" in values:
            _external(key, values)  # importable, a Callback, takes these keys
            continue
        if name not in known:
            extra = sorted(set(known) - set(BUILT_IN))
            raise ConfigError(
                f"{key.split('.')[0]}: {name!r} is not a callback; allowed: {', '.join(extra)} "
                f"(or {key}._target_=module.Class)"
            )
        if key.startswith("logger.") and known[name].stage != "sink":
            raise ConfigError(f"logger.sinks: {name} is not a sink (add it with +callbacks={name})")
        build_config(config_class("callback", name), values, prefix=key, owner=name)


def build_callbacks(
    cfg: DictConfig, stop_after: int | None = None, world: World = SINGLE
) -> list[Callback]:
    """The run's callbacks: the built-in ones, the logger's sinks and `callbacks`, sorted by
    stage."""
    check_callbacks(cfg)
    known = table("callback")
    progress = known["progress"]
    out: list[Callback] = [
        known["evaluation"](),
        known["participation"](),
        progress(progress.Config(enabled=bool(cfg.progress))),
        known["files"](),
        DivergenceCallback(),
        CheckpointCallback(checkpoint_config(cfg), stop_after, world),
    ]
    for name, key in requested(cfg):
        values = _select(cfg, key)
        if "_target_" in values:
            out.append(_external(key, values))
            continue
        cls = known[name]
        out.append(cls(build_config(cls.Config, values, prefix=key, owner=name)))
    return sorted(out, key=lambda cb: STAGES.index(cb.stage))


def follower_callbacks(cfg: DictConfig, stop_after: int | None, world: World) -> list[Callback]:
    """A rank > 0 evaluates and writes nothing: the guards only (every rank decides a stop the same
    way)."""
    return [
        DivergenceCallback(),
        CheckpointCallback(checkpoint_config(cfg), stop_after, world),
    ]
