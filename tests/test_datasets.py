"""Real parsing code on tiny files written in each dataset's own on-disk format."""

import pickle
import struct

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedbench.config import typed_choice
from fedbench.data.datasets import (
    load_cifar10,
    load_digits,
    load_mnist,
    load_mnist5k,
    load_synthetic_logistic,
)


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + array.tobytes())


def test_mnist_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (60, 28, 28)), np.arange(60) % 10
    xte, yte = rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10
    write_idx(raw / "train-images-idx3-ubyte", xtr)
    write_idx(raw / "train-labels-idx1-ubyte", ytr)
    write_idx(raw / "t10k-images-idx3-ubyte", xte)
    write_idx(raw / "t10k-labels-idx1-ubyte", yte)
    ds = load_mnist(typed_choice("dataset", {"name": "mnist", "root": str(tmp_path), "val_fraction": 0.1}))
    assert ds.x_train.shape[1:] == (1, 28, 28) and len(ds.y_train) + len(ds.y_val) == 60
    assert len(ds.y_val) == 10  # 10% of each class held out
    assert torch.equal(torch.sort(ds.y_test).values, torch.sort(torch.as_tensor(yte)).values)
    # the pixels survive parsing: undo the normalisation of the first test image
    img = ds.x_test[0, 0].numpy() * 0.3081 + 0.1307
    np.testing.assert_allclose(img * 255, xte[0], atol=1e-3)


def test_cifar10_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", 10) for i in range(1, 6)], ("test_batch", 10)]:
        entry = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "labels": list(np.arange(n) % 10)}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    ds = load_cifar10(typed_choice("dataset", {"name": "cifar10", "root": str(tmp_path), "val_fraction": 0.2}))
    assert ds.x_train.shape[1:] == (3, 32, 32)
    assert len(ds.y_train) == 40 and len(ds.y_val) == 10 and len(ds.y_test) == 10 and ds.num_classes == 10


def test_embedded_datasets():
    split = {"val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0}
    m = load_mnist5k(typed_choice("dataset", {"name": "mnist5k", **split}))
    assert len(m.y_train) + len(m.y_val) + len(m.y_test) == 5000
    assert torch.bincount(m.y_test).tolist() == [100] * 10  # stratified: exactly 500 per class in mnist5k
    d = load_digits(typed_choice("dataset", {"name": "digits", **split}))
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797 and d.input_shape == (1, 8, 8)


def test_synthetic_logistic_support_and_labels():
    cfg = typed_choice("dataset", {"name": "synthetic_logistic", "d": 200, "n": 4000, "true_density": 0.05,
                                   "corr": 0.2, "coef": "normal", "generator_seed": 1, "val_fraction": 0.1,
                                   "test_fraction": 0.2, "split_seed": 0})
    ds = load_synthetic_logistic(cfg)
    assert len(ds.true_support) == 10
    theta = ds.info["theta_true"]
    assert set(np.flatnonzero(theta)) == set(ds.true_support.tolist())
    x = ds.x_train.double().numpy()
    # labels follow the model: the Bayes rule is far better than chance
    acc = ((x @ theta > 0).astype(int) == ds.y_train.numpy()).mean()
    assert acc > 0.7
    # Toeplitz correlation between neighbouring features
    assert abs(np.corrcoef(x[:, 0], x[:, 1])[0, 1] - 0.2) < 0.06


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn", "lenet5", "resnet18"])
def test_backbones_build_and_split(name):
    from fedbench.models.backbones import build_model

    for shape in [(1, 28, 28), (1, 8, 8), (3, 32, 32)]:
        if name == "resnet18" and shape != (3, 32, 32):
            continue
        norm = {"norm": "group", "groups": 2} if name == "resnet18" else {}
        m = build_model(OmegaConf.create({"name": name, **norm}), shape, 10)
        x = torch.zeros(2, *shape)
        assert m(x).shape == (2, 10)
        assert torch.equal(m.head(m.body(x)), m(x))
