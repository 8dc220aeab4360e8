"""Typed configs: every config group declares its keys ONCE, as a frozen dataclass with the defaults and
the allowed values next to each other (`spec(default, gt=0, ...)`).

Methods: `register_schemas()` stores each method's defaults as Hydra config `method_schema/NAME` that the
YAML presets extend. Every group (run keys, hardware, logger, warm start, features, metrics, and each
dataset, partition and backbone) is checked by `build_config`: unknown keys, wrong types (a string where a
boolean or a list belongs) and out-of-range values are one line each, naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from fedbench.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Check:
    """What a key allows beyond its type: a numeric interval (applied to each element of a list),
    a set of choices, or a non-empty string."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    nonempty: bool = False

    def interval(self) -> str:
        if self.ge is None and self.gt is None:
            return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"
        low = f"{'[' if self.gt is None else '('}{self.ge if self.gt is None else self.gt:g}"
        if self.le is None and self.lt is None:
            return f">= {self.ge:g}" if self.gt is None else f"> {self.gt:g}"
        return f"in {low}, {self.le if self.lt is None else self.lt:g}{']' if self.lt is None else ')'}"

    def ok_number(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __call__(self, key: str, value: Any, shown: Any, integer: bool, optional: bool) -> None:
        null = " or null" if optional else ""
        items = value if isinstance(value, tuple) else (value,)
        if self.choices is not None and any(v not in self.choices for v in items):
            each = "each entry " if isinstance(value, tuple) else ""
            raise ConfigError(f"{key}={shown}: {each}allowed: {', '.join(map(str, self.choices))}{null}")
        if self.nonempty and not str(value).strip():
            raise ConfigError(f"{key}={shown!r}: must not be empty")
        numbers = value if isinstance(value, tuple) else (value,)
        has_range = any(b is not None for b in (self.ge, self.gt, self.le, self.lt))
        for v in numbers:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if isinstance(v, float) and not math.isfinite(v) or has_range and not self.ok_number(v):
                    what = "an integer" if integer else "a finite number"
                    each = "each entry " if isinstance(value, tuple) else ""
                    raise ConfigError(f"{key}={shown}: {each}must be {what}"
                                      f"{' ' + self.interval() if has_range else ''}{null}")


def spec(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None, choices: Sequence[Any] | None = None, nonempty: bool = False) -> Any:
    """A config key's default with what it allows, e.g. `lr: float = spec(0.05, gt=0)`."""
    check = Check(ge, gt, le, lt, tuple(choices) if choices is not None else None, nonempty)
    return dataclasses.field(default=default, metadata={"check": check})


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """Base of every typed config group."""


@dataclasses.dataclass(frozen=True)
class MethodConfig(GroupConfig):
    """Base of every method's config: the registered name of the method."""

    name: str = ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (list, tuple):
        inner = typing.get_args(tp)
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(inner[0], 'values')}" if inner else "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def show(value: Any) -> str:
    """A value as it is written on the command line: true/false, null, 'text', [a, b]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def _convert(key: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or a ConfigError naming the key and the type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(key, value, arg)
            except ConfigError:
                continue
        null = " or null" if type(None) in args else ""
        raise ConfigError(f"{key}={show(value)}: must be "
                          f"{' or '.join(_type_name(a) for a in args if a is not type(None))}{null}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            example = f", e.g. {key}=[{value}]" if isinstance(value, str) and value and args == (str, ...) else ""
            raise ConfigError(f"{key}={show(value)}: must be {_type_name(tp)}{example}")
        inner = args[0] if args else Any
        try:
            return tuple(_convert(key, v, inner) for v in value)
        except ConfigError:
            raise ConfigError(f"{key}={show(list(value))}: must be {_type_name(tp)}") from None
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={show(value)}: must be a mapping, e.g. {key}={{a: 1}}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={show(value)}: must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={show(value)}: must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={show(value)}: must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={show(value)}: must be a string")
        return value
    return value


def _is_integer(tp: Any) -> bool:
    """Whether `tp` holds integers (an int, an optional int, a list of ints)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return all(_is_integer(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (list, tuple):
        return bool(typing.get_args(tp)) and typing.get_args(tp)[0] is int
    return tp is int


def build_config(config_cls: type[GroupConfig], values: Mapping[str, Any], prefix: str = "method",
                 owner: str | None = None) -> Any:
    """The frozen config of a group from composed values; an unknown key, a wrong type or a value out of
    range is one line naming the key (`prefix.key`) and what it allows. `owner` names the choice the keys
    belong to in that line (default: `method=NAME`)."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        owner = owner or f"method={values.get('name')}"
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key for {owner}; allowed: {', '.join(sorted(fields))}")
    typed = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        typed[k] = _convert(key, v, hints[k])
        check = fields[k].metadata.get("check")
        if check is not None and typed[k] is not None:
            optional = type(None) in typing.get_args(hints[k])
            shown = list(typed[k]) if isinstance(typed[k], tuple) else v
            check(key, typed[k], shown, _is_integer(hints[k]), optional)
    return config_cls(**typed)


def defaults_of(config_cls: type[GroupConfig], name: str | None = None) -> dict[str, Any]:
    """{key: default} of a config class, as plain YAML-able values (the Hydra schema)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        out[f.name] = list(value) if isinstance(value, tuple) else value
    if name is not None:
        out["name"] = name
    return out


def register_schemas() -> None:
    """Store every registered method's defaults as Hydra config `method_schema/NAME`."""
    from hydra.core.config_store import ConfigStore

    from fedbench.registry import table

    store = ConfigStore.instance()
    for name, method_cls in table("method").items():
        store.store(group="method_schema", name=name, node=defaults_of(method_cls.Config, name))


def typed_choice(kind: str, node: Any) -> Any:
    """The typed config of a group choice (dataset, partition, backbone) from its composed node or a
    mapping; an already typed config is returned as it is. Builders read only typed configs, so every
    default is the dataclass's (written once). A plugin choice without a typed config gets its node."""
    from omegaconf import OmegaConf

    from fedbench.registry import config_class

    if isinstance(node, GroupConfig):
        return node
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    config_cls = config_class(kind, str(values.get("name")))
    if config_cls is None:
        return node
    return build_config(config_cls, values, prefix=kind, owner=f"{kind}={values.get('name')}")
