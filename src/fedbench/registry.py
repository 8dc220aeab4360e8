"""Name -> builder tables, one per kind (method, backbone, dataset, partition, callback).

Builders register themselves with `@register(kind, name)`. The modules of each kind are found by
convention (every module of the kind's package is imported on first use), so a new method is one module
in `fedbench/methods/` and one YAML in `conf/method/`. Methods outside the package are plugins: name their
modules in `FEDBENCH_PLUGINS` (comma-separated) or declare them in the `fedbench.methods` entry-point group.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from fedbench.errors import ConfigError

_TABLES: dict[str, dict[str, Any]] = {}
_CONFIGS: dict[str, dict[str, Any]] = {}  # kind -> name -> the typed config class of that choice
_PACKAGES = {"method": ("fedbench.methods",), "dataset": ("fedbench.data",),
             "partition": ("fedbench.data",), "availability": ("fedbench.data",),
             "backbone": ("fedbench.models",),
             "callback": ("fedbench.callbacks",)}  # one module per callback
# single modules that register builders too: the built-in callbacks live with the run they serve
_MODULES = {"callback": ("fedbench.run.callbacks", "fedbench.run.evaluation", "fedbench.run.participation",
                         "fedbench.run.sinks")}
_DISCOVERED: set[str] = set()


def register(kind: str, name: str, config: Any = None) -> Callable[[Any], Any]:
    """Decorator: make `fn` the builder for `kind=name`; `config` is the typed config class its keys are
    checked against (a dataclass of `fedbench.config`; methods carry theirs as `Method.Config`)."""

    def deco(fn: Any) -> Any:
        _TABLES.setdefault(kind, {})[name] = fn
        if config is not None:
            _CONFIGS.setdefault(kind, {})[name] = config
        return fn

    return deco


def _import_package(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, package + "."):
        importlib.import_module(info.name)


def discover(kind: str) -> None:
    """Import every module that may register a builder of `kind` (once per process)."""
    if kind in _DISCOVERED:
        return
    _DISCOVERED.add(kind)
    for module in _MODULES.get(kind, ()):
        importlib.import_module(module)
    for package in _PACKAGES.get(kind, ()):
        _import_package(package)
    if kind == "method":
        for name in filter(None, (m.strip() for m in os.environ.get("FEDBENCH_PLUGINS", "").split(","))):
            importlib.import_module(name)
        for ep in entry_points(group="fedbench.methods"):
            ep.load()


def table(kind: str) -> dict[str, Any]:
    discover(kind)
    return dict(_TABLES.get(kind, {}))


def lookup(kind: str, name: str, key: str | None = None) -> Any:
    """The builder of `kind=name`; an unknown name is one line naming `key` (default: the kind)."""
    known = table(kind)
    if name not in known:
        raise ConfigError(f"{key or kind}={name!r} is unknown; allowed: {', '.join(sorted(known))}")
    return known[name]


def config_class(kind: str, name: str) -> Any:
    """The typed config class registered for `kind=name`, or None (a plugin without one: not checked)."""
    discover(kind)
    return _CONFIGS.get(kind, {}).get(name)


def names(kind: str) -> list[str]:
    return sorted(table(kind))
