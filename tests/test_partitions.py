"""Partition statistics that can fail."""

import time

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedbench.data.partitions import label_entropy, make_partition
from fedbench.errors import ConfigError


def labels_like_mnist5k(n_per_class=500, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


def cfg(**kw):
    """A partition group's keys (the Dirichlet ones only for dirichlet: other choices refuse them)."""
    base = {"name": "dirichlet", "min_samples": 2, "client_val_fraction": 0.0, "client_test_fraction": 0.0}
    if kw.get("name", "dirichlet") == "dirichlet":
        base.update(alpha=0.5, max_retries=100, balance=False)
    base.update(kw)
    return OmegaConf.create(base)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_seeded_determinism_and_disjoint_cover(name):
    y = labels_like_mnist5k()
    a = make_partition(y, 20, cfg(name=name), seed=3)
    b = make_partition(y, 20, cfg(name=name), seed=3)
    c = make_partition(y, 20, cfg(name=name), seed=4)
    assert all(np.array_equal(x, z) for x, z in zip(a.train, b.train, strict=True))
    assert any(not np.array_equal(x, z) for x, z in zip(a.train, c.train, strict=True))
    allidx = np.concatenate(a.train)
    assert len(allidx) == len(np.unique(allidx)) == len(y)  # a partition: disjoint and complete


def test_large_alpha_matches_global_label_mix():
    y = labels_like_mnist5k()
    part = make_partition(y, 20, cfg(alpha=1000.0), seed=0)
    counts = part.class_counts(y, 10)
    props = counts / counts.sum(1, keepdims=True)
    # every client within a few points of the uniform global mix
    assert np.abs(props - 0.1).max() < 0.06
    assert label_entropy(counts).min() > 0.97 * np.log(10)


def test_small_alpha_gives_few_classes():
    y = labels_like_mnist5k()
    part = make_partition(y, 20, cfg(alpha=0.05, min_samples=1), seed=0)
    counts = part.class_counts(y, 10)
    # classes that hold >= 5% of a client's data
    dominant = ((counts / counts.sum(1, keepdims=True)) >= 0.05).sum(1)
    assert dominant.mean() <= 3.0
    assert label_entropy(counts).mean() < 0.5 * np.log(10)


def test_thousand_clients_partition_quickly():
    y = labels_like_mnist5k()
    t0 = time.perf_counter()
    # 5 samples per client on average: plain redraws cannot give every client a sample, so the
    # partition fails fast with a hint; the balance cap makes it work
    with pytest.raises(ConfigError, match="balance=true"):
        make_partition(y, 1000, cfg(alpha=0.5, min_samples=1, max_retries=50), seed=0)
    part = make_partition(y, 1000, cfg(alpha=0.5, min_samples=1, balance=True), seed=0)
    assert part.num_clients == 1000 and part.sizes().min() >= 1
    assert time.perf_counter() - t0 < 60  # generous: a hang would blow far past it
    iid = make_partition(y, 1000, cfg(name="iid"), seed=0)
    assert set(iid.sizes()) == {5}


def test_impossible_requests_raise_one_clear_error():
    y = labels_like_mnist5k()
    with pytest.raises(ConfigError, match="more than the 5000 training samples"):
        make_partition(y, 6000, cfg(), seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        make_partition(y, 10, cfg(alpha=0.0), seed=0)
    with pytest.raises(ConfigError, match="min_samples"):
        make_partition(y, 100, cfg(min_samples=60), seed=0)
    # satisfiable on paper but not by Dirichlet draws with tiny alpha: bounded retries, then an error
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"after 20 draws with alpha=0.001 and clients=500"):
        make_partition(y, 500, cfg(alpha=0.001, min_samples=5, max_retries=20), seed=0)
    assert time.perf_counter() - t0 < 60
    with pytest.raises(ConfigError, match="shards"):
        make_partition(y, 2000, cfg(name="shards", shards_per_client=3, min_samples=1), seed=0)


def test_balance_cap_evens_sizes():
    y = labels_like_mnist5k()
    free = make_partition(y, 20, cfg(alpha=0.3), seed=1).sizes()
    capped = make_partition(y, 20, cfg(alpha=0.3, balance=True), seed=1).sizes()
    assert capped.std() < free.std()


def test_local_splits_are_carved_from_the_client():
    y = labels_like_mnist5k()
    part = make_partition(y, 10, cfg(client_val_fraction=0.1, client_test_fraction=0.2), seed=0)
    for tr, va, te in zip(part.train, part.val, part.test, strict=True):
        n = len(tr) + len(va) + len(te)
        assert abs(len(te) - 0.2 * n) <= 1 and abs(len(va) - 0.1 * n) <= 1
        assert not set(tr) & set(te) and not set(tr) & set(va) and not set(va) & set(te)
