"""Name -> builder tables, one per kind (method, backbone, dataset, partition)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedbench.errors import ConfigError

_TABLES: dict[str, dict[str, Callable[..., Any]]] = {}


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make `fn` the builder for `kind=name`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _TABLES.setdefault(kind, {})[name] = fn
        return fn

    return deco


def lookup(kind: str, name: str) -> Callable[..., Any]:
    table = _TABLES.get(kind, {})
    if name not in table:
        raise ConfigError(f"{kind}={name!r} is unknown; allowed: {', '.join(sorted(table))}")
    return table[name]


def names(kind: str) -> list[str]:
    return sorted(_TABLES.get(kind, {}))
