"""RCV1 multi-label (FLoPS's fifth task): the LIBSVM multi-label files read in their real format (written
here, bz2 like the real ones), a sigmoid per topic, micro-F1 / Hamming accuracy checked by hand."""

from __future__ import annotations

import bz2

import numpy as np
import pytest
import torch

from conftest import compose_cfg, run_cli
from fedbench.data.datasets import load_dataset
from fedbench.errors import ConfigError
from fedbench.experiment import run_experiment
from fedbench.metrics.evaluate import evaluate_fn

TERMS, TOPICS = 60, 8


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse TF-IDF-like rows (unit norm) and topics drawn from a sparse logistic model per topic."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, TERMS)) * (rng.random((n, TERMS)) < np.linspace(0.6, 0.05, TERMS))
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    theta = np.zeros((TERMS, TOPICS))
    theta[rng.choice(TERMS, 12, replace=False)] = rng.normal(0, 12, (12, TOPICS))
    y = rng.random((n, TOPICS)) < 1 / (1 + np.exp(-(x @ theta - 1.0)))
    return x.astype(np.float32), y


def write_libsvm(path, x: np.ndarray, y: np.ndarray, compress: bool) -> None:
    """LIBSVM multi-label text: 'l1,l2 index:value ...' with 1-based term indices; topic ids as in RCV1
    (arbitrary integers, here 30 + column)."""
    lines = []
    for row, labels in zip(x, y, strict=True):
        topics = ",".join(str(30 + j) for j in np.flatnonzero(labels))
        terms = " ".join(f"{j + 1}:{row[j]:.6f}" for j in np.flatnonzero(row))
        lines.append(f"{topics} {terms}")
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(bz2.compress(data) if compress else data)


@pytest.fixture(scope="module")
def rcv1_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "rcv1").mkdir()
    x, y = planted(600, 0)
    write_libsvm(root / "rcv1" / "rcv1_topics_train.svm.bz2", x, y, compress=True)
    xt, yt = planted(200, 1)
    write_libsvm(root / "rcv1" / "rcv1_topics_test_0.svm", xt, yt, compress=False)
    return root, x, y, xt, yt


def test_rcv1_reads_the_libsvm_files_keeps_frequent_terms_and_topics(rcv1_root):
    root, x, y, xt, yt = rcv1_root
    cfg = compose_cfg(["dataset=rcv1", f"dataset.root={root}", "dataset.max_features=40",
                       "dataset.val_fraction=0", "dataset.test_files=[rcv1_topics_test_0.svm]",
                       "dataset.max_test_samples=150"]).dataset
    ds = load_dataset(cfg)
    assert ds.task == "multilabel" and ds.input_shape == (40,)
    present = y.sum(0) > 0
    # topics ordered by frequency (ties by id), terms by document frequency (ties by index), kept in order
    topics = sorted(np.flatnonzero(present), key=lambda j: (-y[:, j].sum(), j))
    terms = np.sort(sorted(range(TERMS), key=lambda j: (-(x[:, j] != 0).sum(), j))[:40])
    assert ds.info["topics"] == [30.0 + j for j in topics] and ds.num_classes == len(topics)
    assert ds.info["terms"] == terms.tolist()
    torch.testing.assert_close(ds.x_train, torch.from_numpy(x[:, terms]), rtol=0, atol=1e-6)
    assert torch.equal(ds.y_train, torch.from_numpy(y[:, topics].astype(np.float32)))
    assert ds.x_test.shape == (150, 40)
    assert torch.equal(ds.y_test, torch.from_numpy(yt[:150][:, topics].astype(np.float32)))


def test_rcv1_run_scores_micro_f1_and_hamming_accuracy_by_hand(rcv1_root, tmp_path):
    """A FedAvg logistic model per topic over a Dirichlet split by each document's most frequent topic:
    final/test_f1, final/test_hamming_acc and the loss equal sklearn / a hand BCE on the final model."""
    from sklearn.metrics import f1_score

    root = rcv1_root[0]
    cfg = compose_cfg(["dataset=rcv1", f"dataset.root={root}", "dataset.max_features=50", "method=fedavg",
                       "partition=dirichlet", "partition.alpha=0.5", "clients=5", "rounds=4", "lr=2.0",
                       "batch_size=32", "logger=local", "progress=false", "hardware=cpu",
                       "hardware.dtype=float64"])
    s = run_experiment(cfg, tmp_path)
    assert s["best/val_f1"] is not None and s["best/round"] in range(1, 5)
    params = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["gstate"]["params"]
    ds = load_dataset(cfg.dataset)
    logits = ds.x_test.double() @ params["head.weight"].T + params["head.bias"]
    truth = ds.y_test.numpy().astype(bool)
    pred = (logits > 0).numpy()
    assert s["final/test_f1"] == pytest.approx(f1_score(truth, pred, average="micro"), abs=1e-12)
    assert s["final/test_hamming_acc"] == pytest.approx((pred == truth).mean(), abs=1e-12)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, ds.y_test.double(), reduction="sum")
    assert s["final/test_loss"] == pytest.approx(float(bce) / len(truth), rel=1e-6)  # scored in float32
    assert s["final/test_f1"] > 0.5  # it learned something: the topics are a planted sparse model
    from fedbench.run.summary import format_summary

    text = format_summary(s)
    assert "best val F1" in text and "Hamming acc" in text and "best val acc" not in text


def test_flops_rcv1_preset_runs_gated_per_topic(rcv1_root, tmp_path):
    root = rcv1_root[0]
    s = run_experiment(compose_cfg(["+experiment=flops_rcv1", f"dataset.root={root}", "dataset.max_features=50",
                                    "rounds=12", "method.prune_start=6", "logger=local", "progress=false",
                                    "hardware=cpu"]), tmp_path)
    assert s["sparsity/n_gated"] >= 50 * 7 and s["sparsity/density"] <= 0.05 + 1e-9
    assert 0.0 <= s["final/test_f1"] <= 1.0 and "sparsity/tdr" not in s  # no true support known


def test_stacked_evaluation_of_multilabel_runs_equals_one_at_a_time():
    """The fused launcher's evaluation (models stacked, one vmap) == evaluate_fn per model."""
    from fedbench.run.evaluation import _evaluate_runs

    torch.manual_seed(0)
    model = torch.nn.Linear(10, 4).double()
    x, y = torch.randn(70, 10, dtype=torch.float64), (torch.rand(70, 4) < 0.3).double()
    runs = [{k: torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    stacked = {k: torch.stack([r[k] for r in runs]) for k in runs[0]}
    got = _evaluate_runs(model, stacked, {}, x, y, "multilabel", 3, batch=32)
    for r, g in zip(runs, got, strict=True):
        want = evaluate_fn(lambda xb, r=r: torch.func.functional_call(model, r, (xb,)), x, y, "multilabel")
        assert g.keys() == want.keys() and g["f1"] == want["f1"] and g["hamming_acc"] == want["hamming_acc"]
        assert g["loss"] == pytest.approx(want["loss"], rel=1e-6)  # float32 sums in another order


def test_rcv1_without_its_files_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"rcv1_topics_train.svm.bz2 not found in .*dataset.download=false"):
        load_dataset(compose_cfg(["dataset=rcv1", f"dataset.root={tmp_path}"]).dataset)
    (tmp_path / "rcv1").mkdir()
    (tmp_path / "rcv1" / "rcv1_topics_train.svm.bz2").write_bytes(b"not bz2 at all")
    r = run_cli(["dataset=rcv1", f"dataset.root={tmp_path}", "rounds=1"], tmp_path)
    assert r.returncode == 2 and "dataset=rcv1" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
