"""A study's definition (conf/study/NAME.yaml): what is compared, on which settings, with which
budget.

Loaded with OmegaConf (interpolations such as ${oc.env:WANDB_MODE,offline} work), command-line
`key=value` overrides merged on top, then checked: a wrong value is one line naming the key
(`StudyError`, exit 2) before any run starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fedbench.errors import ConfigError

LAUNCHERS = ("basic", "local_parallel", "slurm", "fused")
SAMPLERS = ("tpe", "random")
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
SETTING_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a setting is a dir name only (alpha0.1)
# keys the study sets on every run itself: a study file must not set them in its overrides
STUDY_KEYS = ("seed", "rounds", "hydra.sweep.dir", "hydra/launcher", "hydra/sweeper")


class StudyError(ConfigError):
    """A study definition that cannot work: one line naming the key and what is allowed."""


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a search space: float or int (log or linear), or a list of choices."""

    key: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        return f"{self.key} {'log-' if self.log else ''}uniform [{self.low:g}, {self.high:g}]" + (
            " (int)" if self.kind == "int" else ""
        )


@dataclass(frozen=True)
class Entry:
    """A method or a setting: a name and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]
    space: tuple[
        Param, ...
    ] = ()  # methods only: the search space (the study's plus the method's own)


@dataclass(frozen=True)
class StudySpec:
    name: str
    base: tuple[str, ...]
    settings: tuple[Entry, ...]
    methods: tuple[Entry, ...]
    trials: int
    rounds: int
    tune_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    parallel_trials: int
    launcher: str
    launcher_overrides: tuple[str, ...]
    sampler: str
    sampler_seed: int
    startup_trials: int
    alpha: float
    wandb: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(
        default_factory=dict
    )  # the resolved definition, as written to study.yaml

    def setting(self, name: str) -> Entry:
        return next(s for s in self.settings if s.name == name)


def study_file(name_or_path: str) -> Path:
    """conf/study/NAME.yaml (shipped with fedbench) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise StudyError(f"study: no file {path}")
        return path
    shipped = resources.files("fedbench.conf") / "study" / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = sorted(
            p.name[:-5]
            for p in (resources.files("fedbench.conf") / "study").iterdir()
            if p.name.endswith(".yaml")
        )
        raise StudyError(
            f"study: no study named '{name_or_path}'; shipped: {', '.join(names)} "
            f"(or give a path to a YAML file)"
        )
    return Path(str(shipped))


def load_study(name_or_path: str, overrides: list[str] | None = None) -> StudySpec:
    cfg = OmegaConf.load(study_file(name_or_path))
    for item in overrides or []:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise StudyError(f"study override '{item}': expected key=value")
        if OmegaConf.select(cfg, key, default=None) is None and key.split(".")[0] not in (
            "launcher_overrides",
            "wandb",
            "sampler",
            "budget",
        ):
            raise StudyError(
                f"study override '{item}': no key '{key}' in the study "
                f"(keys: {', '.join(str(k) for k in cfg)})"
            )
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that cannot resolve: one line
        raise StudyError(f"study: {str(e).splitlines()[0]}") from None
    return parse(data)


def _ints(data: dict[str, Any], key: str, minimum: int) -> tuple[int, ...]:
    values = data.get(key)
    if not isinstance(values, list) or not values or not all(isinstance(v, int) for v in values):
        raise StudyError(f"study.{key}={values}: give a non-empty list of integers")
    if len(set(values)) != len(values) or min(values) < minimum:
        raise StudyError(f"study.{key}={values}: integers >= {minimum}, each once")
    return tuple(values)


def _int(data: dict[str, Any], key: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise StudyError(f"study.{key}={value}: an integer >= {minimum}")
    return value


def _overrides(where: str, values: Any) -> tuple[str, ...]:
    if values is None:
        return ()
    if not isinstance(values, (list, ListConfig)) or not all(
        isinstance(v, str) and "=" in v for v in values
    ):
        raise StudyError(f"study.{where}={values}: a list of fedbench overrides (key=value)")
    for v in values:
        key = v.split("=", 1)[0].lstrip("+~")
        if key in STUDY_KEYS:
            raise StudyError(
                f"study.{where}: '{v}' sets {key}, which the study sets itself (budget.rounds, "
                f"seeds, tune_seeds, launcher)"
            )
        if "," in v.split("=", 1)[1] and not v.split("=", 1)[1].lstrip().startswith("["):
            raise StudyError(
                f"study.{where}: '{v}' is a sweep; a study runs the sweep itself "
                f"(list the values as settings)"
            )
    return tuple(values)


def parse_param(key: str, text: Any) -> Param:
    """A search space in the Optuna sweeper's syntax: `tag(log, interval(1e-3, 0.5))`,
    `interval(1, 8)` (ints when both ends are), `choice(a, b)`, `range(1, 5)`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    where = f"study space {key}={text}"
    try:
        value = OverridesParser.create().parse_override(f"{key}={text}").value()
    except Exception:  # noqa: BLE001 - the grammar's own message is a wall of text
        raise StudyError(
            f"{where}: expected tag(log, interval(LOW, HIGH)), interval(LOW, HIGH), "
            f"choice(A, B, ...) or range(START, STOP)"
        ) from None
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        log = "log" in value.tags
        if not low < high or (log and low <= 0):
            raise StudyError(f"{where}: LOW < HIGH{' and LOW > 0 on a log scale' if log else ''}")
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        return Param(key, kind, low, high, log)
    if isinstance(value, ChoiceSweep):
        return Param(key, "categorical", choices=tuple(value.list))
    if isinstance(value, RangeSweep):
        return Param(key, "categorical", choices=tuple(value.range()))
    raise StudyError(
        f"{where}: a search space, not a fixed value (fixed values go in the overrides)"
    )


def _space(where: str, space: Any) -> tuple[Param, ...]:
    if space is None:
        return ()
    if not isinstance(space, dict):
        raise StudyError(
            f"study.{where}={space}: a mapping KEY: SPACE, e.g. lr: tag(log, interval(0.01, 0.5))"
        )
    return tuple(parse_param(str(k), v) for k, v in space.items())


def _entries(data: dict[str, Any], key: str, shared: tuple[Param, ...] = ()) -> tuple[Entry, ...]:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise StudyError(f"study.{key}: a non-empty list of {{name, overrides}}")
    out: list[Entry] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise StudyError(f"study.{key}[{i}]: give a name and its overrides")
        name = item["name"]
        pattern = SETTING_NAME if key == "settings" else NAME
        if not pattern.match(name):
            raise StudyError(
                f"study.{key}[{i}].name={name}: letters, digits, _ and -"
                f"{' and .' if key == 'settings' else ''} only"
            )
        unknown = (
            set(item) - {"name", "overrides", "space"}
            if key == "methods"
            else set(item) - {"name", "overrides"}
        )
        if unknown:
            raise StudyError(f"study.{key}[{i}] ({name}): unknown keys {sorted(unknown)}")
        own = _space(f"{key}[{i}].space", item.get("space"))
        space = tuple(p for p in shared if p.key not in {q.key for q in own}) + own
        overrides = _overrides(f"{key}[{i}].overrides", item.get("overrides"))
        fixed = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        clash = sorted(fixed & {p.key for p in space})
        if clash:
            raise StudyError(
                f"study.{key}[{i}] ({name}): {clash[0]} is both fixed in the overrides and "
                f"tuned in the space; keep one"
            )
        out.append(Entry(name, overrides, space))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise StudyError(f"study.{key}: names must differ ({names})")
    return tuple(out)


KEYS = (
    "name",
    "base",
    "settings",
    "methods",
    "space",
    "budget",
    "tune_seeds",
    "seeds",
    "parallel_trials",
    "launcher",
    "launcher_overrides",
    "sampler",
    "alpha",
    "wandb",
)


def parse(data: dict[str, Any]) -> StudySpec:
    if not isinstance(data, dict):
        raise StudyError("study: the file must be a mapping")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise StudyError(f"study: unknown key '{unknown[0]}' (keys: {', '.join(sorted(KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise StudyError(f"study.name={name}: letters, digits, _ and - only")
    base = _overrides("base", data.get("base"))
    settings = _entries(data, "settings")
    methods = _entries(data, "methods", _space("space", data.get("space")))
    tuned = {p.key for m in methods for p in m.space}
    for where, overrides in (
        ("base", base),
        *((f"settings ({s.name})", s.overrides) for s in settings),
    ):
        clash = sorted(tuned & {o.split("=", 1)[0].lstrip("+~") for o in overrides})
        if clash:  # a command-line value would win over the trial's: the tuner would tune nothing
            raise StudyError(
                f"study.{where}: {clash[0]} is tuned in a search space; it cannot be fixed here"
            )
    return StudySpec(
        name=name,
        base=base,
        settings=settings,
        methods=methods,
        **_budget(data),
        **_running(data),
        source=data,
    )


def _budget(data: dict[str, Any]) -> dict[str, Any]:
    """trials, rounds and the two seed lists (disjoint)."""
    budget = data.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - {"trials", "rounds"}:
        raise StudyError(
            f"study.budget={budget}: give trials (per method and setting) and rounds (per run)"
        )
    tune_seeds, seeds = _ints(data, "tune_seeds", 0), _ints(data, "seeds", 0)
    both = sorted(set(tune_seeds) & set(seeds))
    if both:
        raise StudyError(
            f"study.seeds: seed {both[0]} is also a tuning seed; the final runs use "
            f"other seeds (tune_seeds={list(tune_seeds)})"
        )
    return {
        "trials": _int(data, "budget.trials", budget.get("trials"), 1),
        "rounds": _int(data, "budget.rounds", budget.get("rounds"), 1),
        "tune_seeds": tune_seeds,
        "seeds": seeds,
    }


def _running(data: dict[str, Any]) -> dict[str, Any]:
    """How the trials are run and judged: launcher, sampler, significance level, W&B."""
    launcher = data.get("launcher", "basic")
    if launcher not in LAUNCHERS:
        raise StudyError(f"study.launcher={launcher}: one of {', '.join(LAUNCHERS)}")
    sampler = data.get("sampler") or {}
    if not isinstance(sampler, dict) or sampler.get("name", "tpe") not in SAMPLERS:
        name = sampler.get("name") if isinstance(sampler, dict) else sampler
        raise StudyError(f"study.sampler.name={name}: one of {', '.join(SAMPLERS)}")
    alpha = data.get("alpha", 0.05)
    if not isinstance(alpha, float) or not 0 < alpha < 1:
        raise StudyError(f"study.alpha={alpha}: a significance level in (0, 1), e.g. 0.05")
    wandb = data.get("wandb") or {}
    if wandb.get("mode", "offline") not in ("offline", "online", "disabled"):
        raise StudyError(f"study.wandb.mode={wandb.get('mode')}: offline, online or disabled")
    return {
        "parallel_trials": _int(data, "parallel_trials", data.get("parallel_trials", 1), 1),
        "launcher": launcher,
        "launcher_overrides": _overrides("launcher_overrides", data.get("launcher_overrides")),
        "sampler": sampler.get("name", "tpe"),
        "sampler_seed": _int(data, "sampler.seed", sampler.get("seed", 0), 0),
        "startup_trials": _int(
            data, "sampler.startup_trials", sampler.get("startup_trials", 10), 0
        ),
        "alpha": alpha,
        "wandb": dict(wandb),
    }


def as_yaml(spec: StudySpec) -> str:
    return OmegaConf.to_yaml(DictConfig(spec.source))
