"""Hydra composition of many jobs, faster. A sweep's command composes every job three times (fedbench's
pre-flight, Hydra's sweeper validating the batch, the launcher), and each time Hydra re-reads every YAML
file and re-merges the whole defaults list (~0.25 s a job here). Within `shared_composition()` Hydra's
config loader keeps, for the command, its YAML cache and the merged config of each distinct defaults
list; everything else (resolving the defaults list, applying the command-line overrides on top, the
hydra node) is Hydra's own code, run per job as always. Jobs that differ only in values (seed=0,1,2
lr=...) then cost a copy and their overrides, and a job composed again (Hydra's sweeper validates every
job before the launcher composes it) costs a copy; the configs are equal to Hydra's uncached ones
(tested).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.config_repository import CachingConfigRepository
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

_ORIGINAL = (ConfigLoaderImpl._parse_overrides_and_create_caching_repo,
             ConfigLoaderImpl._compose_config_from_defaults_list,
             ConfigLoaderImpl._load_configuration_impl)


class _SharedFiles(CachingConfigRepository):
    """A per-composition repository (Hydra may change what it loaded while composing, so every
    composition gets its own copies, as with Hydra's own per-composition cache) over sources
    initialised once and files read once."""

    def __init__(self, delegate: Any, files: dict[str, Any], key: tuple[Any, ...]):
        self.delegate, self.cache, self.files, self.key = delegate, {}, files, key

    def load_config(self, config_path: str) -> Any:
        if config_path not in self.cache:
            if config_path not in self.files:
                self.files[config_path] = self.delegate.load_config(config_path=config_path)
            self.cache[config_path] = copy.deepcopy(self.files[config_path])
        return self.cache[config_path]


@contextlib.contextmanager
def shared_composition() -> Iterator[None]:
    """Hydra's config loaders share their YAML files and merged defaults lists inside the block
    (re-entrant: an inner block uses the outer one's caches)."""
    if ConfigLoaderImpl._parse_overrides_and_create_caching_repo is not _ORIGINAL[0]:
        yield
        return
    original_repo, original_merge, original_load = _ORIGINAL
    composed: dict[tuple[Any, ...], DictConfig] = {}
    sources: dict[tuple[Any, ...], tuple[Any, Any, dict[str, Any]]] = {}
    merged: dict[tuple[Any, ...], DictConfig] = {}

    def shared_repo(self: ConfigLoaderImpl, config_name: str | None, overrides: list[str]) -> Any:
        # the sources depend on the loader, the config name and the search path
        key = (id(self), config_name, tuple(o for o in overrides if "searchpath" in o))
        if key not in sources:
            sources[key] = (self, original_repo(self, config_name, overrides)[1].delegate, {})
        _, delegate, files = sources[key]
        return OverridesParser.create().parse_overrides(overrides=overrides), _SharedFiles(delegate, files, key)

    def cached_merge(self: ConfigLoaderImpl, defaults: list[Any], repo: Any) -> DictConfig:
        key = (repo.key, tuple((d.config_path, d.parent, d.package, d.is_self, d.primary) for d in defaults))
        if key not in merged:
            merged[key] = original_merge(self, defaults=defaults, repo=repo)
        return copy.deepcopy(merged[key])

    def cached_load(self: ConfigLoaderImpl, config_name: str | None, overrides: list[str], run_mode: Any,
                    from_shell: bool = True, validate_sweep_overrides: bool = True) -> DictConfig:
        # the same job composed again (Hydra's sweeper validates each job, then the launcher composes it)
        key = (id(self), config_name, tuple(overrides), run_mode, from_shell, validate_sweep_overrides,
               os.getcwd())
        if key not in composed:
            composed[key] = original_load(self, config_name, overrides, run_mode, from_shell,
                                          validate_sweep_overrides)
        return copy.deepcopy(composed[key])

    ConfigLoaderImpl._parse_overrides_and_create_caching_repo = shared_repo
    ConfigLoaderImpl._compose_config_from_defaults_list = cached_merge
    ConfigLoaderImpl._load_configuration_impl = cached_load
    try:
        yield
    finally:
        (ConfigLoaderImpl._parse_overrides_and_create_caching_repo,
         ConfigLoaderImpl._compose_config_from_defaults_list,
         ConfigLoaderImpl._load_configuration_impl) = _ORIGINAL
