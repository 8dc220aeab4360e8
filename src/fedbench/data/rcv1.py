"""RCV1-v2 topics, multi-label (FLoPS's fifth task: a sparse logistic model per label).

Reads the LIBSVM multi-label files (https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/
multilabel.html#rcv1v2%20(topics;%20full%20sets)): `rcv1_topics_train.svm.bz2` (23,149 documents) and,
optionally, the four `rcv1_topics_test_{0..3}.svm.bz2` (781,265), each line `l1,l2,... index:value ...`
with cosine-normalised TF-IDF values over 47,236 terms and 101 topics. Parsed by scikit-learn's
`load_svmlight_files` (plain, .gz or .bz2). The inputs become dense: `max_features` keeps the terms
that occur in the most training documents, `max_labels` the most frequent topics (both reconstructed
choices: the paper's preprocessing is not known).
"""

from __future__ import annotations

import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbench.config import spec
from fedbench.data.datasets import Dataset, HeldOutTestConfig, _from_arrays
from fedbench.errors import ConfigError
from fedbench.registry import register

log = logging.getLogger("fedbench")

LIBSVM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multilabel/"


@dataclass(frozen=True)
class RCV1Config(HeldOutTestConfig):
    input: str = spec("vector", choices=("vector",))
    root: str = spec("data", nonempty=True)        # the files live in ROOT/rcv1/
    download: bool = False
    train_file: str = spec("rcv1_topics_train.svm.bz2", nonempty=True)
    # LIBSVM's test parts (rcv1_topics_test_0.svm.bz2 ...); empty: test_fraction of the training file
    test_files: tuple[str, ...] = ()
    max_test_samples: int | None = spec(None, ge=1)  # the first N documents of the test files
    max_features: int | None = spec(2000, ge=1)      # the terms in the most training documents; null: all
    max_labels: int | None = spec(None, ge=1)        # the most frequent topics; null: every topic present


def _files(cfg: Any) -> list[Path]:
    folder = Path(cfg.root) / "rcv1"
    names = [cfg.train_file, *cfg.test_files]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and cfg.download:
        folder.mkdir(parents=True, exist_ok=True)
        for name in missing:
            tmp = folder / f".{name}.{os.getpid()}.part"
            try:
                urllib.request.urlretrieve(LIBSVM_URL + name, tmp)  # noqa: S310 - a fixed https URL
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise ConfigError(f"dataset=rcv1: download of {LIBSVM_URL + name} failed ({e}); copy it to "
                                  f"{folder} instead") from e
            os.replace(tmp, folder / name)
        missing = []
    if missing:
        raise ConfigError(f"dataset=rcv1: {', '.join(missing)} not found in {folder} and dataset.download=false; "
                          f"put the LIBSVM multi-label files there (from {LIBSVM_URL}) or run where there is "
                          f"network with dataset.download=true")
    return [folder / n for n in names]


def _label_matrix(labels: list[tuple[float, ...]], ids: np.ndarray) -> np.ndarray:
    """[n, len(ids)] 0/1 of the topics in `ids` each document carries."""
    column = {float(v): j for j, v in enumerate(ids)}
    y = np.zeros((len(labels), len(ids)), dtype=np.float32)
    for i, doc in enumerate(labels):
        for v in doc:
            j = column.get(float(v))
            if j is not None:
                y[i, j] = 1.0
    return y


@register("dataset", "rcv1", config=RCV1Config)
def load_rcv1(cfg: Any) -> Dataset:
    from sklearn.datasets import load_svmlight_files

    paths = _files(cfg)
    try:
        parts = load_svmlight_files([str(p) for p in paths], multilabel=True, dtype=np.float32)
    except (ValueError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ConfigError(f"dataset=rcv1: {paths[0].parent} holds a file that is not LIBSVM multi-label "
                          f"text ({first}); copy it again") from e
    x_train, y_train = parts[0], parts[1]
    docs = np.asarray((x_train != 0).sum(0)).ravel()
    order = np.argsort(-docs, kind="stable")               # terms by document frequency, ties by index
    keep = np.sort(order[:cfg.max_features]) if cfg.max_features else np.arange(x_train.shape[1])
    found, counts = np.unique(np.concatenate([np.asarray(d, dtype=np.float64) for d in y_train] or [[]]),
                              return_counts=True)
    ids = found[np.argsort(-counts, kind="stable")][:cfg.max_labels or None]  # most frequent first
    x = x_train[:, keep].toarray()
    y = _label_matrix(y_train, ids)
    x_test = y_test = None
    if cfg.test_files:  # sliced while sparse: the full test set is 781,265 documents
        room = cfg.max_test_samples or sum(parts[i].shape[0] for i in range(2, len(parts), 2))
        xs, ys = [], []
        for i in range(2, len(parts), 2):
            take = min(room, parts[i].shape[0])
            xs.append(parts[i][:take, keep].toarray())
            ys.append(_label_matrix(parts[i + 1][:take], ids))
            room -= take
        x_test, y_test = np.concatenate(xs).astype(np.float32), np.concatenate(ys)
    log.info("rcv1: %d training documents, %d of %d terms, %d topics", len(y), len(keep), x_train.shape[1],
             len(ids))
    return _from_arrays("rcv1", x.astype(np.float32), y, cfg, len(ids), x_test, y_test, task="multilabel",
                        stratify=False, info={"terms": keep.tolist(), "topics": ids.tolist()})
