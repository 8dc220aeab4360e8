"""Hugging Face datasets (optional extra `pip install -e '.[hf]'`): any dataset by hub name, a local
`save_to_disk` folder or a folder of parquet/csv/json files, read through the `datasets` library with its
cache (HF_DATASETS_OFFLINE=1 is honoured), converted once to whole tensors like every other dataset.

Images (`dataset.image_key`) become float tensors [N, C, H, W] scaled to [0, 1] and standardised per
channel with the training split's mean and std; tabular data (`dataset.feature_keys`) become [N, d].
Columns named in `dataset.keep_columns` (e.g. FEMNIST's writer_id) stay with the training pool for
`partition=natural`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbench.config import spec, typed_choice
from fedbench.data.datasets import IMAGE_NORMALIZATIONS, Dataset, HeldOutTestConfig, _from_arrays, image_stats
from fedbench.errors import ConfigError
from fedbench.registry import register

log = logging.getLogger("fedbench")
PRESETS = ("hf", "cifar10_hf", "cifar100_hf", "tiny_imagenet_hf", "femnist_hf", "cinic10_hf")


@dataclass(frozen=True)
class HFConfig(HeldOutTestConfig):
    """conf/dataset/hf.yaml: where the dataset is and which columns hold inputs, labels and kept values."""

    path: str = spec("", nonempty=True)      # hub name or local folder (required)
    config_name: str | None = None
    split: str = spec("train", nonempty=True)
    test_split: str | None = "test"          # null: hold out test_fraction of `split`
    image_key: str = spec("image", nonempty=True)
    feature_keys: tuple[str, ...] | None = None   # tabular data: numeric columns instead of images
    label_key: str = spec("label", nonempty=True)
    keep_columns: tuple[str, ...] = ()
    cache_dir: str | None = None
    # images: standardize (the training split's per-channel statistics) | half | imagenet (datasets.py)
    normalize: str = spec("standardize", choices=IMAGE_NORMALIZATIONS)


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or one line saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the optional package '{module.split('.')[0]}': "
                          f"pip install -e '.[{extra}]'") from None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a TCP connection within `timeout_s`."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable(datasets: Any) -> Iterator[None]:
    """Without a network, read the cache only: the libraries would otherwise retry the hub for half a
    minute before saying what one line says at once."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    log.info("the Hugging Face hub is not reachable: reading the local cache only")
    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def open_splits(cfg: Any) -> dict[str, Any]:
    """{split name: datasets.Dataset} from a hub name or a local folder; one line when it is not there."""
    datasets = require("datasets", "hf", f"dataset={cfg.name}")
    path = str(cfg.path)
    local = Path(path).expanduser()
    try:
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            obj = datasets.load_from_disk(str(local))
        elif local.exists():
            obj = datasets.load_dataset(path, cfg.config_name, cache_dir=cfg.cache_dir)
        else:
            with offline_unless_reachable(datasets):
                obj = datasets.load_dataset(path, cfg.config_name, cache_dir=cfg.cache_dir)
    except Exception as e:  # noqa: BLE001 - hub, cache and file errors all mean: not available here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"dataset.path={path}: not loadable here ({first[:160]}); with no network or "
                          f"HF_DATASETS_OFFLINE=1 it must be in the Hugging Face cache or a local folder: "
                          f"pre-fetch with python -c \"import datasets; datasets.load_dataset('{path}')\" "
                          f"where there is network (README, Datasets)") from None
    return {"train": obj} if isinstance(obj, datasets.Dataset) else dict(obj)


def _column(ds: Any, key: str, setting: str) -> Any:
    if key not in ds.column_names:
        raise ConfigError(f"{setting}={key}: no such column; the dataset has {', '.join(ds.column_names)}")
    values = ds.select_columns([key]).with_format("numpy")[:][key]  # the whole column, decoded once
    if isinstance(values, list) or (isinstance(values, np.ndarray) and values.dtype == np.dtype(object)):
        # ragged or nested (e.g. images as arrays of rows): one array per row
        values = [np.asarray(v) for v in values]
        return np.stack(values) if values and all(v.shape == values[0].shape for v in values) else values
    return np.asarray(values)


def _images(ds: Any, key: str) -> np.ndarray:
    arr = _column(ds, key, "dataset.image_key")
    if isinstance(arr, list):
        raise ConfigError(f"dataset.image_key={key}: images of different sizes; resize them to one size first")
    if arr.ndim == 3:  # grayscale [N, H, W]
        arr = arr[:, None]
    elif arr.ndim == 4:  # [N, H, W, C]
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise ConfigError(f"dataset.image_key={key}: expected images, got an array of shape {arr.shape}")
    return np.ascontiguousarray(arr).astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)


def _inputs(ds: Any, cfg: Any) -> np.ndarray:
    if cfg.feature_keys:
        return np.stack([np.asarray(_column(ds, k, "dataset.feature_keys"), dtype=np.float32)
                         for k in cfg.feature_keys], 1)
    return _images(ds, str(cfg.image_key))


def _labels(ds: Any, key: str, names: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    y = np.asarray(_column(ds, key, "dataset.label_key"))
    import datasets

    feature = ds.features[key]
    if names is None and isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    if y.dtype.kind in "iu":
        return y.astype(np.int64), names
    names = names or sorted({str(v) for v in y})  # string labels: their sorted order
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in y], dtype=np.int64), names


def load_hf(cfg: Any) -> Dataset:
    cfg = typed_choice("dataset", cfg)  # (a typed config is returned as it is)
    splits = open_splits(cfg)
    train_name, test_name = str(cfg.split), cfg.test_split
    for key, name in (("dataset.split", train_name), ("dataset.test_split", test_name)):
        if name is not None and str(name) not in splits:
            raise ConfigError(f"{key}={name}: no such split; the dataset has {', '.join(splits)}")
    train = splits[train_name]
    x = _inputs(train, cfg)
    y, names = _labels(train, str(cfg.label_key), None)
    x_test = y_test = None
    if test_name is not None:
        x_test = _inputs(splits[str(test_name)], cfg)
        y_test, _ = _labels(splits[str(test_name)], str(cfg.label_key), names)
    if x.ndim == 4:  # images per channel: the training split's statistics, or fixed ones
        mean, std = x.mean((0, 2, 3), keepdims=True), x.std((0, 2, 3), keepdims=True) + 1e-8
        if cfg.normalize != "standardize":
            fixed = image_stats(cfg.normalize, [0.0] * x.shape[1], [1.0] * x.shape[1])
            mean, std = (np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1) for v in fixed)
        x = (x - mean) / std
        x_test = None if x_test is None else (x_test - mean) / std
    columns = {str(k): np.asarray(_column(train, str(k), "dataset.keep_columns"))
               for k in cfg.keep_columns}
    num_classes = len(names) if names else int(max(y.max(), -1 if y_test is None else y_test.max())) + 1
    return _from_arrays(str(cfg.name), x, y, cfg, num_classes, x_test=x_test, y_test=y_test, columns=columns,
                        info={"source": str(cfg.path), "class_names": names})


for _name in PRESETS:  # the generic loader and its presets share one reader
    register("dataset", _name, config=HFConfig)(load_hf)
