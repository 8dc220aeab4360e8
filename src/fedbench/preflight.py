"""The CLI's pre-flight: before Hydra starts anything, every job of the command is composed, every value
checked (`validate`), and what needs the data built once without writing (`dry_build`); the launcher's
and the sweeper's keys are checked too. A mistake is one line naming the key (and, in a sweep, the job),
and nothing runs, so nothing is written.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedbench.errors import ConfigError

GROUPS = ("method", "backbone", "dataset", "partition", "availability", "hardware", "logger", "callbacks", "experiment")
ADDED_GROUPS = ("callbacks", "experiment")  # selected with +: +callbacks=[early_stop,csv], +experiment=NAME
SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(")
PREFLIGHT_JOBS: dict[str, Any] = {}  # what the pre-flight learnt: number of jobs, (fingerprint, overrides)


def search_dirs(argv: list[str]) -> list[Path]:
    """Extra config dirs from a `hydra.searchpath=[file://DIR,...]` override (plugins' YAML presets)."""
    dirs: list[Path] = []
    for arg in argv:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            for item in arg.split("=", 1)[1].strip("[]").split(","):
                item = item.strip().strip("'\"").replace("\\:", ":")  # a swept job's value escapes ':'
                if item.startswith("file://"):
                    dirs.append(Path(item[len("file://"):]))
    return dirs


def available(group: str, extra_dirs: list[Path] | None = None) -> list[str]:
    roots = [resources.files("fedbench.conf") / group, *(d / group for d in extra_dirs or [])]
    return sorted({p.name[:-5] for root in roots if root.is_dir() for p in root.iterdir() if p.name.endswith(".yaml")})


def check_group_overrides(argv: list[str]) -> str | None:
    """One clear line for an unknown config-group choice (Hydra's own message is a wall of text)."""
    extra = search_dirs(argv)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS:
            continue
        choices = available(key, extra)
        listed = value.startswith("[") and value.endswith("]")  # +callbacks=[a,b] selects several
        value = value[1:-1] if listed else value
        values = value.split(",") if value and not value.startswith(SWEEP_FUNCTIONS) else [value]
        for v in values:
            if v and v not in choices:
                return f"{key}={v!r} is unknown; allowed: {', '.join(choices)}"
    return None


def missing_sweeper(argv: list[str]) -> str | None:
    """hydra/sweeper=tune needs the Optuna sweeper plugin (an optional extra)."""
    tuned = any(a in ("hydra/sweeper=tune", "hydra/sweeper=optuna") for a in argv)
    if tuned and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        return "hydra/sweeper=tune needs the optional package 'hydra-optuna-sweeper': pip install -e '.[tune]'"
    return None


# ---- Hydra's messages as one line ----------------------------------------------------------------

def _top_level_keys() -> list[str]:
    from hydra import compose

    return sorted(k for k in compose("config") if k not in GROUPS)


def composition_error(e: Exception, job: list[str]) -> str:
    """Hydra's multi-line composition and parsing errors as one line that keeps Hydra's hints (+key,
    --multirun) and lists what is allowed: the keys of a group, the groups, the options of a group."""
    from hydra import compose

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    ambiguous = re.match(r"Ambiguous value for argument '([^']+)'", text)
    if ambiguous:
        arg = ambiguous.group(1)
        key, _, value = arg.partition("=")
        return (f"{arg}: a comma-separated value; to sweep over it add --multirun (fedbench --multirun {arg}); "
                f"a list is {key}=[{value}], a string is {key}='{value}'")
    if text.startswith("Sweep parameters") and "requires --multirun" in text:
        return f"{text.split(chr(39))[1]}: a sweep; add --multirun to run it"
    if type(e).__name__ == "OverrideParseException":
        bad = unparsable(job) or "an override"
        return (f"{bad}: cannot parse this override ({lines[0][:80]}); quote a value that holds brackets, "
                f"commas or spaces: 'key=\"value\"' (Hydra's override grammar)")
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        options = [line for line in lines[lines.index(next((ln for ln in lines if ln.startswith("Available options")),
                                                           lines[-1])) + 1:] if "provider=" not in line
                   and not line.startswith("Config search path")]
        return f"{group}={option!r} is unknown; allowed: {', '.join(options) or '(none found)'}"
    found = re.search(r"Could not override '([^']+)'", text)
    if found:
        key = found.group(1)
        hint = next((ln for ln in lines if ln.startswith("To append")), "")
        parent, _, leaf = key.rpartition(".")
        if not parent:  # a top-level key or group name that does not exist
            words = list(GROUPS) + _top_level_keys()
            near = difflib.get_close_matches(key, words, n=1)
            guess = f"did you mean {near[0]}? " if near else ""
            if "No match in the defaults list" in text:
                return f"{key}: not selected by default; {hint[0].lower() + hint[1:] if hint else ''}".strip()
            plain = ", ".join(g for g in GROUPS if g not in ADDED_GROUPS)
            added = ", ".join(f"+{g}" for g in ADDED_GROUPS)
            return (f"{key}: unknown key or config group; {guess}groups: {plain}, {added}; "
                    f"top-level keys: {', '.join(_top_level_keys())}")
        rest = [o for o in job if not o.lstrip("+~").startswith(key + "=")]
        try:
            node = OmegaConf.select(compose("config", overrides=rest, return_hydra_config=parent.startswith("hydra")),
                                    parent)
        except Exception:  # noqa: BLE001 - fall back to Hydra's own words
            node = None
        if node is not None and OmegaConf.is_dict(node):
            return f"{key}: unknown key; allowed: {', '.join(sorted(node))}"
        return f"{key}: unknown key"
    cause = str(e.__cause__).splitlines()[0] if e.__cause__ is not None else ""
    return f"{text} {cause}".strip()


def unparsable(job: list[str]) -> str | None:
    """The first override Hydra's grammar cannot parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in job:
        try:
            parser.parse_overrides([o])
        except Exception:  # noqa: BLE001 - any parse failure names this override
            return o
    return None


def unknown_added_key(job: list[str], cfg: DictConfig) -> str | None:
    """A top-level key added with `+` that no part of fedbench reads (e.g. a typo such as +roudns=3)."""
    from hydra import compose

    extra = search_dirs(job)  # a group of a search-path dir (e.g. a study's +study_trial=...) is a preset

    def added_key(o: str) -> str | None:
        key = o.lstrip("+").split("=", 1)[0]
        top = o.startswith("+") and not o.startswith("++") and "." not in key and "/" not in key
        group = key in GROUPS or any((d / key).is_dir() for d in extra)
        return key if top and not group else None  # +experiment=NAME selects a preset

    top = [k for k in map(added_key, job) if k is not None]
    if not top:
        return None
    known = set(compose("config", overrides=[o for o in job if added_key(o) is None]))
    for key in top:
        if key not in known:
            return f"+{key}: unknown top-level key (nothing reads it); allowed: {', '.join(sorted(known))}"
    return None


# ---- sweeps -------------------------------------------------------------------------------------

def _sweep_values(override: Any) -> list[Any]:
    """The values of a sweep override worth checking: every choice, the ends of a range or interval."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        return list(sweep.list)
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        return values[:1] + values[-1:]
    if isinstance(sweep, IntervalSweep):
        return [sweep.start, sweep.end]
    return [sweep]


def tuning_jobs(overrides: list[str]) -> list[list[str]]:
    """Jobs that cover a tuning sweeper's search space (its preset's `params` and the command line's sweep
    overrides): the base job with every dimension at each of its checked values in turn (Optuna samples
    inside these bounds)."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    space = compose("config", overrides=fixed, return_hydra_config=True).hydra.sweeper.get("params") or {}
    given = {o.key_or_group for o in parsed if o.is_sweep_override()}
    preset = [o for o in parser.parse_overrides([f"{k}={v}" for k, v in space.items() if k not in given])
              if o.is_sweep_override()]
    dims = [(o.key_or_group, _sweep_values(o)) for o in [*preset, *parsed] if o.is_sweep_override()]
    first = [f"{key}={values[0]}" for key, values in dims]
    jobs = [fixed + first]
    for i, (key, values) in enumerate(dims):
        for v in values[1:]:
            jobs.append(fixed + first[:i] + [f"{key}={v}"] + first[i + 1:])
    return jobs


def expand(overrides: list[str], multirun: bool, sweeper: str | None) -> list[list[str]]:
    if not multirun:
        return [overrides]
    if sweeper not in (None, "basic"):
        return tuning_jobs(overrides)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _sweeper_params(overrides: list[str]) -> str | None:
    """`hydra.sweeper.params.KEY=...` on the command line: Hydra cannot parse a search space there."""
    for o in overrides:
        if o.startswith("hydra.sweeper.params."):
            key, _, space = o[len("hydra.sweeper.params."):].partition("=")
            return (f"{o.split('=')[0]}: give the search space as the key itself, '{key}={space}' "
                    f"(the tuning sweeper reads it from there)")
    return None


def _dry_build_key(cfg: DictConfig) -> str:
    """Jobs that differ only in what the dry build does not look at share one dry build."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for k in ("lr", "logger", "progress", "eval_every", "checkpoint_every", "resume", "output_root",
              "metrics", "paper"):
        data.pop(k, None)
    return json.dumps(data, sort_keys=True, default=str)


def preflight(argv: list[str]) -> str | None:
    """Compose and check every job before Hydra starts anything (a multirun is expanded the way Hydra's
    basic sweeper does it; a tuning sweep at the ends of its search space), so a bad key or value stops
    the command with one line and no job is launched. Returns the error line, or None. Options other
    than -m are left to Hydra (--cfg, --help, -cd ...)."""
    PREFLIGHT_JOBS.clear()
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    logger = logging.getLogger("fedbench")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the dry build's INFO lines are the run's to say, once
    try:
        return _preflight(argv, multirun)
    finally:
        logger.setLevel(level)


def _preflight(argv: list[str], multirun: bool) -> str | None:
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from fedbench.composition import shared_composition
    from fedbench.run.build import dry_build
    from fedbench.run.launchers import check_hydra_config
    from fedbench.run.state import fingerprint
    from fedbench.run.validation import validate

    overrides = [a for a in argv if not a.startswith("-")]
    sweeper = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra/sweeper=")), None)
    msg = _sweeper_params(overrides)
    if msg:
        return msg
    with initialize_config_module(config_module="fedbench.conf", version_base="1.3"), shared_composition():
        try:
            jobs = expand(overrides, multirun, sweeper)
        except HydraException as e:
            return composition_error(e, overrides)
        PREFLIGHT_JOBS.update(n=len(jobs) if sweeper in (None, "basic") else None, planned=[])
        built: set[str] = set()
        on_slurm = False
        for index, job in enumerate(jobs):
            where = f" (in the job {' '.join(job)})" if multirun else ""
            try:
                if index == 0:  # one composition gives the launcher's and sweeper's keys and the job's
                    full = compose("config", overrides=job, return_hydra_config=True)
                    hc = full.hydra
                    on_slurm = "slurm" in str(hc.launcher.get("_target_", "")).lower()
                    check_hydra_config(hc, len(jobs))
                    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
                else:
                    cfg = compose("config", overrides=job)
                validate(cfg, check_device=not on_slurm)  # the login node may have no GPU
                unknown = unknown_added_key(job, cfg)
                if unknown:
                    return f"{unknown}{where}"
                key = _dry_build_key(cfg)
                if key not in built:
                    dry_build(cfg)
                    built.add(key)
                PREFLIGHT_JOBS["planned"].append((fingerprint(cfg), job))
            except ConfigError as e:
                return f"{e}{where}"
            except (HydraException, OmegaConfBaseException) as e:
                return f"{composition_error(e, job)}{where}"
            except Exception as e:  # a bug, not a wrong value: one line, the traceback on request
                if os.environ.get("FEDBENCH_TRACEBACK"):
                    raise
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                return (f"internal error while checking the config{where}: {type(e).__name__}: {first} "
                        f"(FEDBENCH_TRACEBACK=1 shows the traceback)")
    return None
