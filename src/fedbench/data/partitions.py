"""Seeded client partitions. Each returns one index array per client (into the training pool).

All of them fail fast with a ConfigError instead of looping on impossible requests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbench.config import GroupConfig, spec, typed_choice
from fedbench.errors import ConfigError
from fedbench.registry import register

# ---- typed configs (the keys of conf/partition/*.yaml, checked before any work) ----------------

@dataclass(frozen=True)
class PartitionConfig(GroupConfig):
    """Keys every partition has: its seed and the clients' local validation / test splits."""

    name: str = ""
    seed: int | None = spec(None, ge=0)             # null: the run seed
    client_val_fraction: float = spec(0.0, ge=0, lt=1)
    client_test_fraction: float = spec(0.0, ge=0, lt=1)
    # clients that never train (unseen/* scores them): this share of the clients, drawn with the seed
    holdout_clients: float = spec(0.0, ge=0, lt=1)

    def __post_init__(self) -> None:
        if self.client_val_fraction + self.client_test_fraction >= 1:
            raise ConfigError(f"partition.client_val_fraction + partition.client_test_fraction = "
                              f"{self.client_val_fraction + self.client_test_fraction:g}: must leave each "
                              f"client training samples (< 1)")


@dataclass(frozen=True)
class IidConfig(PartitionConfig):
    quantity_skew: float = spec(0.0, ge=0)          # lognormal sigma of the client sizes (0: equal sizes)
    min_samples: int = spec(2, ge=1)


@dataclass(frozen=True)
class DirichletConfig(PartitionConfig):
    alpha: float = spec(0.5, gt=0)                  # small alpha = more label skew
    min_samples: int = spec(10, ge=1)               # every client gets at least this many, else redraw
    max_retries: int = spec(100, ge=1)
    balance: bool = False                           # cap: a client holding >= n/N samples receives no more


@dataclass(frozen=True)
class ShardsConfig(PartitionConfig):
    shards_per_client: int = spec(2, ge=1)
    min_samples: int = spec(1, ge=1)


@dataclass(frozen=True)
class NoniidSConfig(PartitionConfig):
    rule: str = spec("fedpac", choices=("fedpac", "disjoint"))
    s: float = spec(0.2, ge=0, le=1)                # iid share of every client's samples
    group_size: int = spec(3, ge=1)                 # rule fedpac: classes per dominant group
    group_stride: int = spec(2, ge=1)               # rule fedpac: a new group every group_stride classes
    groups: int = spec(5, ge=1)                     # rule disjoint: number of disjoint class groups
    local_size: int | None = spec(None, ge=1)       # samples per client (null: FedPAC's 900 or what fits)
    min_samples: int = spec(1, ge=1)
    client_val_fraction: float = spec(0.1, ge=0, lt=1)
    client_test_fraction: float = spec(1 / 3, ge=0, lt=1)


@dataclass(frozen=True)
class NaturalConfig(PartitionConfig):
    key: str = spec("writer_id", nonempty=True)     # the kept column naming each sample's owner


@dataclass(frozen=True)
class FlwrConfig(PartitionConfig):
    partitioner: str = spec("IidPartitioner", nonempty=True)  # a flwr-datasets partitioner class name
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class FileConfig(PartitionConfig):
    """A partition written by another run (its partition.json) or another tool, in that format."""

    path: str = spec("???", nonempty=True)


@dataclass
class Partition:
    """Per-client index sets into the training pool, with local train/val/test splits; `holdout`: the
    clients that never train (scored as unseen clients)."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray]
    holdout: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def sizes(self) -> np.ndarray:
        return np.array([len(t) for t in self.train], dtype=np.int64)

    def class_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """[N, C] class counts of every client's local training split."""
        return np.stack([np.bincount(labels[t], minlength=num_classes) for t in self.train])


def _check_common(n_samples: int, n_clients: int, min_samples: int) -> None:
    if n_clients < 1:
        raise ConfigError(f"clients={n_clients}: must be >= 1")
    if n_clients > n_samples:
        raise ConfigError(f"clients={n_clients} is more than the {n_samples} training samples; "
                          f"use clients <= {n_samples}")
    if n_clients * min_samples > n_samples:
        raise ConfigError(f"partition.min_samples={min_samples} x clients={n_clients} exceeds the "
                          f"{n_samples} training samples; lower one of them")


@register("partition", "iid", config=IidConfig)
def iid(labels: np.ndarray, n_clients: int, cfg: Any, rng: np.random.Generator,
        columns: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    n = len(labels)
    min_samples = cfg.min_samples
    _check_common(n, n_clients, min_samples)
    perm = rng.permutation(n)
    skew = cfg.quantity_skew
    if skew > 0:
        # lognormal client sizes; every client keeps min_samples, the rest is shared out
        w = rng.lognormal(0.0, skew, n_clients)
        extra = np.floor(w / w.sum() * (n - n_clients * min_samples)).astype(np.int64)
        sizes = extra + min_samples
        sizes[: n - sizes.sum()] += 1
    else:
        sizes = np.full(n_clients, n // n_clients)
        sizes[: n % n_clients] += 1
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


@register("partition", "dirichlet", config=DirichletConfig)
def dirichlet(labels: np.ndarray, n_clients: int, cfg: Any, rng: np.random.Generator,
        columns: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    alpha = float(cfg.alpha)
    if not alpha > 0:
        raise ConfigError(f"partition.alpha={cfg.alpha}: must be a float > 0 (small alpha = more label skew)")
    n = len(labels)
    min_samples = cfg.min_samples
    max_retries = cfg.max_retries
    balance = cfg.balance
    _check_common(n, n_clients, min_samples)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = n / n_clients
    smallest = 0
    for _ in range(max(1, max_retries)):
        sizes = np.zeros(n_clients, dtype=np.int64)
        shares: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n_clients, alpha))
            if balance:
                p = np.where(sizes < cap, p, 0.0)
                total = p.sum()
                p = p / total if total > 0 else np.full(n_clients, 1.0 / n_clients)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                if len(part):
                    shares[k].append(part)
                    sizes[k] += len(part)
        smallest = int(sizes.min())
        if smallest >= min_samples:
            return [np.sort(np.concatenate(s)) if s else np.zeros(0, np.int64) for s in shares]
    raise ConfigError(
        f"partition=dirichlet: after {max_retries} draws with alpha={alpha} and clients={n_clients} the "
        f"smallest client had {smallest} < partition.min_samples={min_samples} samples; raise alpha, "
        f"lower min_samples or clients, or set partition.balance=true"
    )


@register("partition", "shards", config=ShardsConfig)
def shards(labels: np.ndarray, n_clients: int, cfg: Any, rng: np.random.Generator,
        columns: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    per_client = cfg.shards_per_client
    n = len(labels)
    _check_common(n, n_clients, cfg.min_samples)
    n_shards = n_clients * per_client
    if n_shards > n:
        raise ConfigError(f"partition=shards: clients x shards_per_client = {n_shards} shards but only "
                          f"{n} samples; lower partition.shards_per_client or clients")
    # stable sort by label, ties broken by a seeded permutation
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    pieces = np.array_split(order, n_shards)
    assign = rng.permutation(n_shards).reshape(n_clients, per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assign]


def split_local(parts: list[np.ndarray], val_fraction: float, test_fraction: float,
                rng: np.random.Generator) -> Partition:
    """Carve each client's local validation/test split out of its samples."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError("partition.client_val_fraction + client_test_fraction must be in [0, 1)")
    train, val, test = [], [], []
    for idx in parts:
        idx = rng.permutation(idx)
        n_test = int(round(test_fraction * len(idx)))
        n_val = int(round(val_fraction * len(idx)))
        test.append(np.sort(idx[:n_test]))
        val.append(np.sort(idx[n_test:n_test + n_val]))
        train.append(np.sort(idx[n_test + n_val:]))
    return Partition(train, val, test)


def make_partition(labels: np.ndarray, n_clients: int, cfg: Any, seed: int,
                   columns: dict[str, np.ndarray] | None = None) -> Partition:
    """The clients' index sets (`columns`: per-sample columns the dataset kept, for natural splits)."""
    from fedbench.registry import lookup

    fn = lookup("partition", str(cfg.name))
    cfg = typed_choice("partition", cfg)
    rng = np.random.default_rng([int(seed), 0x9A27])
    parts = fn(labels, n_clients, cfg, rng, columns)
    if isinstance(parts, Partition):  # a partition read whole (partition=file)
        return parts
    part = split_local(parts, cfg.client_val_fraction,
                       cfg.client_test_fraction, rng)
    part.holdout = draw_holdout(len(part.train), cfg.holdout_clients, int(seed))
    empty = [k for k, t in enumerate(part.train) if len(t) == 0]
    if empty:
        raise ConfigError(f"partition={cfg.name}: {len(empty)} client(s) got no training samples "
                          f"(e.g. client {empty[0]}); raise partition.min_samples or lower clients")
    return part


def draw_holdout(n_clients: int, fraction: float, seed: int) -> np.ndarray:
    """round(fraction x N) clients that never train, drawn from their own stream of the seed."""
    n_out = int(round(fraction * n_clients))
    if fraction > 0 and n_out == 0:
        raise ConfigError(f"partition.holdout_clients={fraction}: holds out no client of {n_clients}; "
                          f"use at least {1 / n_clients:.3g}")
    if n_out >= n_clients:
        raise ConfigError(f"partition.holdout_clients={fraction}: leaves no client of {n_clients} to train")
    return np.sort(np.random.default_rng([int(seed), 0x401D]).choice(n_clients, n_out, replace=False))


def label_entropy(counts: np.ndarray) -> np.ndarray:
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return h


def partition_stats(part: Partition, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    counts = part.class_counts(labels, num_classes)
    sizes = part.sizes()
    return {
        "label_entropy_mean": float(label_entropy(counts).mean()),
        "classes_per_client_mean": float((counts > 0).sum(1).mean()),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
    }


@register("partition", "noniid_s", config=NoniidSConfig)
def noniid_s(labels: np.ndarray, n_clients: int, cfg: Any, rng: np.random.Generator,
             columns: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """FedPAC / FedeCouple split (`rule: fedpac`, as JianXu95/FedPAC's data_loader): each client gets
    `local_size` samples; int(s * size) of them spread evenly over all classes, the rest evenly over its
    dominant group of `group_size` classes; groups overlap, starting every `group_stride` classes
    ([0,1,2], [2,3,4], ..., [8,9,0] for 10 classes), client k -> group k mod (number of groups). In each
    class the last share takes the remainder. Samples are drawn without replacement in a seeded order.
    `rule: disjoint` is fedbench's earlier split: `groups` disjoint class groups and an iid draw for s.
    The local test/validation splits are carved from each client's samples, so they follow the same mix."""
    s = float(cfg.s)
    if not 0.0 <= s <= 1.0:
        raise ConfigError(f"partition.s={s}: the iid fraction must be in [0, 1]")
    rule = cfg.rule
    if rule not in ("fedpac", "disjoint"):
        raise ConfigError(f"partition.rule={rule!r}: allowed: fedpac, disjoint")
    classes = np.unique(labels)
    _check_common(len(labels), n_clients, cfg.min_samples)
    if rule == "disjoint":
        return _noniid_s_disjoint(labels, classes, n_clients, cfg, s, rng)
    groups = _overlapping_groups(classes, cfg.group_size, cfg.group_stride)
    counts = {c: int((labels == c).sum()) for c in classes}

    def shares(size: int, k: int) -> dict[Any, int]:
        """Samples of each class client k takes at this local size."""
        n_iid = int(size * s)
        take = dict(zip(classes, _even(n_iid, len(classes)), strict=True))
        for c, m in zip(groups[k % len(groups)], _even(size - n_iid, len(groups[k % len(groups)])), strict=True):
            take[c] += m
        return take

    def fits(size: int) -> bool:
        need = {c: 0 for c in classes}
        for k in range(n_clients):
            for c, m in shares(size, k).items():
                need[c] += m
        return all(need[c] <= counts[c] for c in classes)

    size = cfg.local_size
    if size is None:  # FedPAC's 600 train + 300 test, or the largest size the data can give every client
        size = next((m for m in range(900, 0, -1) if fits(m)), 0)
    size = int(size)
    if size < 1 or not fits(size):
        raise ConfigError(f"partition.local_size={size} x clients={n_clients}: some class has too few samples "
                          f"for this split; lower partition.local_size (null: the largest that fits, at most 900)")
    pools = {c: rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
    parts = []
    for k in range(n_clients):
        mine: list[int] = []
        for c, m in shares(size, k).items():
            mine.extend(pools[c][:m])
            del pools[c][:m]
        parts.append(np.sort(np.array(mine, dtype=np.int64)))
    return parts


def _even(total: int, n: int) -> list[int]:
    """`total` spread over n: int(total / n) each, the last takes the remainder (FedPAC's rule)."""
    each = total // n
    return [each] * (n - 1) + [total - each * (n - 1)]


def _overlapping_groups(classes: np.ndarray, size: int, stride: int) -> list[list[Any]]:
    c = len(classes)
    if not 1 <= size <= c or not 1 <= stride <= c:
        raise ConfigError(f"partition.group_size={size}, group_stride={stride}: both must be in [1, {c}]")
    return [[classes[(start + j) % c] for j in range(size)] for start in range(0, c, stride)]


def _noniid_s_disjoint(labels: np.ndarray, classes: np.ndarray, n_clients: int, cfg: Any, s: float,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """fedbench's earlier noniid_s: disjoint class groups (client k -> group k mod `groups`), the s share iid."""
    n_groups = cfg.groups
    if not 1 <= n_groups <= len(classes):
        raise ConfigError(f"partition.groups={n_groups}: must be in [1, {len(classes)}] (the number of classes)")
    n = len(labels)
    size = cfg.local_size
    size = int(size) if size is not None else int(0.95 * n / n_clients)  # slack so the pools never run dry
    if size < 1 or size * n_clients > n:
        raise ConfigError(f"partition.local_size={size} x clients={n_clients} exceeds the {n} training "
                          f"samples; lower partition.local_size (null: 95% of n / clients)")
    group_of_class = {c: g for g, cs in enumerate(np.array_split(classes, n_groups)) for c in cs}
    free = np.ones(n, dtype=bool)
    order = rng.permutation(n)  # a seeded random order; each draw takes the first free matches
    n_dom = int(round((1.0 - s) * size))
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    in_group = np.array([group_of_class[c] for c in labels[order]])
    for k in range(n_clients):  # dominant parts first: their pools are the scarce ones
        cand = order[(in_group == k % n_groups) & free[order]][:n_dom]
        if len(cand) < n_dom:
            raise ConfigError(f"partition=noniid_s: class group {k % n_groups} ran out of samples for client "
                              f"{k}; lower partition.local_size or raise partition.s")
        free[cand] = False
        parts[k].extend(cand.tolist())
    for k in range(n_clients):
        cand = rng.permutation(np.flatnonzero(free))[: size - n_dom]
        free[cand] = False
        parts[k].extend(cand.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


@register("partition", "natural", config=NaturalConfig)
def natural(labels: np.ndarray, n_clients: int, cfg: Any, rng: np.random.Generator,
            columns: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """One client per distinct value of the column `partition.key` (a writer, a speaker, a user), each with
    exactly its own samples; `clients` of the values are sampled with the partition seed."""
    key = str(cfg.key)
    if not columns or key not in columns:
        raise ConfigError(f"partition.key={key}: the dataset keeps no such column (kept: "
                          f"{', '.join(columns or {}) or 'none'}; name it in dataset.keep_columns)")
    values, inverse = np.unique(np.asarray(columns[key]), return_inverse=True)
    if n_clients > len(values):
        raise ConfigError(f"clients={n_clients}: partition=natural has only {len(values)} distinct {key} values; "
                          f"use clients <= {len(values)}")
    chosen = np.sort(rng.choice(len(values), size=n_clients, replace=False))
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(values) + 1))
    return [np.sort(order[bounds[v]:bounds[v + 1]]) for v in chosen]


@register("partition", "flwr", config=FlwrConfig)
def flwr(labels: np.ndarray, n_clients: int, cfg: Any, rng: np.random.Generator,
         columns: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Any flwr-datasets partitioner by class name, applied to the labels (optional extra `hf`)."""
    import inspect

    from fedbench.data.hf import require

    module = require("flwr_datasets.partitioner", "hf", "partition=flwr")
    datasets = require("datasets", "hf", "partition=flwr")
    known = sorted(n for n in dir(module) if n.endswith("Partitioner") and n != "Partitioner")
    cls = vars(module).get(str(cfg.partitioner))
    if str(cfg.partitioner) not in known or cls is None:
        raise ConfigError(f"partition.partitioner={cfg.partitioner} is unknown; allowed: {', '.join(known)}")
    kwargs = dict(cfg.kwargs)
    accepted = inspect.signature(cls).parameters
    if kwargs.setdefault("num_partitions", n_clients) != n_clients:
        raise ConfigError(f"partition.kwargs.num_partitions={kwargs['num_partitions']}: must equal clients={n_clients}")
    if "partition_by" in accepted:
        kwargs.setdefault("partition_by", "label")
    if "seed" in accepted:
        kwargs.setdefault("seed", int(rng.integers(2**31 - 1)))
    try:
        partitioner = cls(**kwargs)
        partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "fedbench_index": np.arange(len(labels))})
        return [np.sort(np.asarray(partitioner.load_partition(i)["fedbench_index"], dtype=np.int64))
                for i in range(n_clients)]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"partition={cfg.partitioner}: {str(e).splitlines()[0]}") from None
