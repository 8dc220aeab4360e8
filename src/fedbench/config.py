"""Typed method configs: each method declares its hyperparameters ONCE, as a dataclass `Config`.

The defaults live only there. `register_schemas()` stores each one as a Hydra config
(`method_schema/NAME`) that the YAML presets extend, so every key can be overridden on the command line
and an unknown key is refused; `build_config` checks the composed values against the dataclass's types
(one clear line per mistake) and returns the frozen instance the method receives.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from fedbench.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: the registered name of the method."""

    name: str = ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


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
        raise ConfigError(f"{key}={value!r}: must be {' or '.join(_type_name(a) for a in args)}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}={value!r}: must be a list")
        inner = args[0] if args else Any
        return tuple(_convert(key, v, inner) for v in value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: must be a string")
        return value
    return value


def build_config(config_cls: type[MethodConfig], values: Mapping[str, Any], prefix: str = "method") -> MethodConfig:
    """The frozen config of a method from composed values; unknown keys and wrong types are one line each."""
    hints = typing.get_type_hints(config_cls)
    fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key for method={values.get('name')}; "
                          f"allowed: {', '.join(sorted(fields))}")
    typed = {k: _convert(f"{prefix}.{k}", v, hints[k]) for k, v in values.items()}
    return config_cls(**typed)


def defaults_of(config_cls: type[MethodConfig], name: str) -> dict[str, Any]:
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
    out["name"] = name
    return out


def register_schemas() -> None:
    """Store every registered method's defaults as Hydra config `method_schema/NAME`."""
    from hydra.core.config_store import ConfigStore

    from fedbench.registry import table

    store = ConfigStore.instance()
    for name, method_cls in table("method").items():
        store.store(group="method_schema", name=name, node=defaults_of(method_cls.Config, name))
