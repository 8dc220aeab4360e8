"""Portable partitions: every run's partition.json carries each client's sample indices and a content
hash of the whole assignment; `partition=file partition.path=FILE` runs on exactly that split.

The format (docs/partition-format.md) in short: a JSON object with
  format          "fedbench-partition/1"
  dataset         {"name", "n_train", "labels_sha256"}: the training pool the indices point into
                  (labels_sha256: SHA-256 of the training labels as little-endian int64)
  clients         N
  indices         N entries [train, val, test], each a sorted list of indices into the training pool
  holdout         sorted client ids that never train
  sha256          SHA-256 of json.dumps({"holdout": ..., "indices": ...}, separators=(",", ":"),
                  sort_keys=True) encoded as UTF-8: two files with the same hash are the same split
Other keys (the partition config, class counts, statistics) are for the reader and are not checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedbench.data.partitions import FileConfig, Partition
from fedbench.errors import ConfigError
from fedbench.registry import register

FORMAT = "fedbench-partition/1"


def labels_sha256(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def assignment_sha256(indices: list[list[list[int]]], holdout: list[int]) -> str:
    text = json.dumps({"holdout": holdout, "indices": indices}, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def portable_fields(part: Partition, labels: np.ndarray, dataset: str) -> dict[str, Any]:
    """The keys of partition.json that make the split portable (indices, hash, what they point into)."""
    indices = [[t.tolist(), v.tolist(), s.tolist()] for t, v, s in zip(part.train, part.val, part.test,
                                                                          strict=True)]
    holdout = part.holdout.tolist()
    return {"format": FORMAT,
            "dataset": {"name": dataset, "n_train": int(len(labels)), "labels_sha256": labels_sha256(labels)},
            "indices": indices, "holdout": holdout, "sha256": assignment_sha256(indices, holdout)}


@register("partition", "file", config=FileConfig)
def read_partition(labels: np.ndarray, n_clients: int, cfg: FileConfig, rng: np.random.Generator,
                   columns: dict[str, np.ndarray] | None = None) -> Partition:
    """The split of `cfg.path`, checked against this run's training pool and `clients`."""
    path = Path(str(cfg.path)).expanduser()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"partition.path={cfg.path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"partition.path={cfg.path}: not a {FORMAT} file (a run's partition.json)")
    data = doc["dataset"]
    if data.get("n_train") != len(labels) or data.get("labels_sha256") != labels_sha256(labels):
        raise ConfigError(f"partition.path={cfg.path}: written for dataset={data.get('name')} "
                          f"({data.get('n_train')} training samples); this run's training pool differs "
                          f"({len(labels)} samples{', other labels' if data.get('n_train') == len(labels) else ''})"
                          f"; use dataset={data.get('name')} or a partition of this dataset")
    if len(doc["indices"]) != n_clients:
        raise ConfigError(f"partition.path={cfg.path}: holds {len(doc['indices'])} clients, the run has "
                          f"clients={n_clients}; set clients={len(doc['indices'])}")
    if assignment_sha256(doc["indices"], doc["holdout"]) != doc.get("sha256"):
        raise ConfigError(f"partition.path={cfg.path}: its indices do not match its sha256 (edited or cut short)")
    if cfg.holdout_clients:
        raise ConfigError(f"partition.holdout_clients={cfg.holdout_clients}: partition=file takes the held-out "
                          f"clients from the file; leave it 0")
    as_array = [[np.asarray(s, dtype=np.int64) for s in client] for client in doc["indices"]]
    flat = np.concatenate([s for client in as_array for s in client]) if as_array else np.zeros(0, np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= len(labels) or len(np.unique(flat)) != len(flat)):
        raise ConfigError(f"partition.path={cfg.path}: indices out of range or given to two clients")
    train, val, test = (list(split) for split in zip(*as_array, strict=True))
    return Partition(train, val, test, np.asarray(doc["holdout"], dtype=np.int64))
