"""Bad input: one clear line on stderr, exit code != 0, no traceback."""

import subprocess
import sys

import pytest
import torch

from conftest import TINY, run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in err_lines if line.startswith("fedbench: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.mark.parametrize("args,fragments", [
    (["method=fedfoo"], ["method='fedfoo' is unknown", "fedavg", "scaffold"]),
    (["partition.alpha=0"], ["partition.alpha=0", "> 0"]),
    (["partition.alpha=-1.5"], ["partition.alpha=-1.5"]),
    (["clients=5000"], ["clients=5000", "training samples"]),
    (["participation=1.5"], ["participation=1.5"]),
    (["hardware.dtype=float16"], ["hardware.dtype=float16", "float32"]),
])
def test_bad_overrides(tmp_path, args, fragments):
    assert_one_line_error(run_cli(TINY + args, tmp_path), *fragments)


# every input a new user tried that used to end in a traceback, run silently, or blame another key
@pytest.mark.parametrize("args,fragments", [
    (["seed=abc"], ["seed='abc'", "integer"]),
    (["hardware.threads=-2"], ["hardware.threads=-2", ">= 1"]),
    (["partition=shards", "partition.shards_per_client=0"], ["partition.shards_per_client=0"]),
    (["backbone=resnet18_imagenet", "backbone.weights=/nonexistent.pt"], ["backbone.weights=/nonexistent.pt"]),
    (["backbone=resnet18", "dataset=synthetic_linear"], ["backbone=resnet18", "dataset=synthetic_linear", "logreg"]),
    (["+roudns=3"], ["+roudns", "unknown top-level key", "rounds"]),
    (["method=fedprox", "method.mu=-1"], ["method.mu=-1"]),
    (["method=fedprox", "method.muu=1"], ["method.muu: unknown key", "mu"]),
    (["method=fedprox", "method.mu=abc"], ["method.mu='abc'", "number"]),
    (["metrics.target=2"], ["metrics.target=2", "(0, 1]"]),
    (["lr=inf"], ["lr=inf", "finite"]),
    (["dataset.val_fraction=1.5"], ["dataset.val_fraction=1.5", "[0, 1)"]),
    (["features.extractor=foo"], ["features.extractor='foo' is unknown", "cnn"]),
    (["warm_start.source=foo"], ["warm_start.source='foo' is unknown", "digits"]),
])
def test_bad_inputs_are_one_line_and_exit_2(args, fragments, monkeypatch, capsys):
    """Through the real entry point (`fedbench` = cli.main), in this process: every case stops in the
    pre-flight, before Hydra starts a job (the subprocess cases above cover the process boundary)."""
    from fedbench import cli

    monkeypatch.setattr(sys, "argv", ["fedbench", *TINY, *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess([], 2, "", err), *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    assert_one_line_error(run_cli(TINY + ["hardware=cuda"], tmp_path), "hardware.device=cuda", "CUDA is not available")


@pytest.mark.parametrize("name,where", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_torchvision_dataset_offline_without_files(tmp_path, name, where):
    proc = run_cli([a for a in TINY if not a.startswith("dataset=")] +
                   [f"dataset={name}", f"dataset.root={tmp_path / 'empty'}"], tmp_path)
    assert_one_line_error(proc, f"dataset={name}", where, "dataset.download=true")


def test_divergence_exits_3_and_keeps_the_rows_but_a_sweep_goes_on(tmp_path):
    import json

    unstable = ["dataset=synthetic_linear", "dataset.d=20", "dataset.n=400", "backbone=logreg", "clients=4",
                "rounds=10", "logger=local", "progress=false", "hardware=cpu"]
    proc = run_cli(unstable + ["lr=10", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert proc.returncode == 3
    assert_one_line_error(proc, "training loss is", "lower lr")
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["status"] == "diverged"
    assert (tmp_path / "one" / "metrics.jsonl").read_text().strip()
    # in a multirun the diverged job is recorded, the other job still runs, and the sweep says so (exit 1)
    proc = run_cli(["--multirun"] + unstable + ["lr=10,0.01", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 1 and "1 completed, 1 diverged" in proc.stderr, proc.stderr[-2000:]
    status = [json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text())["status"] for i in (0, 1)]
    assert status == ["diverged", "completed"]


def _cli_in_process(args, tmp_path, monkeypatch, capsys):
    from fedbench import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedbench", *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    return stop.value.code, capsys.readouterr().err


def test_truncated_dataset_files_are_named_in_one_line(tmp_path, monkeypatch, capsys):
    """Real on-disk formats, cut short: the message names the files, not 'no files there'."""
    import pickle

    import numpy as np

    from test_datasets import write_idx

    base = [a for a in TINY if not a.startswith("dataset=")]
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, shape in (("train-images-idx3-ubyte", (60, 28, 28)), ("train-labels-idx1-ubyte", (60,)),
                        ("t10k-images-idx3-ubyte", (20, 28, 28)), ("t10k-labels-idx1-ubyte", (20,))):
        write_idx(raw / name, rng.integers(0, 10, shape))
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # a copy cut short
    code, err = _cli_in_process(base + ["dataset=mnist", f"dataset.root={tmp_path / 'data'}"], tmp_path / "data",
                                monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(subprocess.CompletedProcess([], 2, "", err), "dataset=mnist", "cannot be read",
                          "truncated or corrupt")
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (10, 3072)).astype(np.uint8), "labels": list(np.arange(10) % 10)}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:700])
    code, err = _cli_in_process(base + ["dataset=cifar10", f"dataset.root={tmp_path / 'cifar'}", "clients=4"],
                                tmp_path / "cifar", monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(subprocess.CompletedProcess([], 2, "", err), "data_batch_3", "truncated or corrupt")


def test_a_corrupt_embedded_cache_is_rebuilt(tmp_path, monkeypatch):
    """A torn or foreign mnist5k cache never breaks every later run: it is parsed again."""
    from omegaconf import OmegaConf

    from fedbench.data.datasets import load_mnist5k

    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path))
    split = OmegaConf.create({"val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0})
    good = load_mnist5k(split)
    cache = tmp_path / "mnist5k.npz"
    for damage in (cache.read_bytes()[:1000], b"not a zip file"):
        cache.write_bytes(damage)
        again = load_mnist5k(split)
        assert torch.equal(again.x_train, good.x_train) and torch.equal(again.y_test, good.y_test)
        assert cache.stat().st_size > 100_000  # rebuilt


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, tiny):
    """A process killed while writing metrics.jsonl leaves half a line: resume drops it and goes on."""
    import json

    from conftest import compose_cfg, read_jsonl
    from fedbench.errors import Preempted
    from fedbench.experiment import run_experiment

    cfg = compose_cfg(tiny + ["rounds=4", "checkpoint_every=1"])
    with pytest.raises(Preempted):
        run_experiment(cfg, tmp_path, stop_after=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "global/val_acc": 0.5')  # torn mid-row
    summary = run_experiment(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_a_write_the_disk_refuses_mid_run_is_one_line(tmp_path):
    """A file-size limit stands in for a full disk: the run stops with one line naming the file, no
    traceback, exit 1."""
    import os
    import resource
    import signal
    import sys

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4500, 4500))  # hydra.yaml fits, a checkpoint not

    proc = subprocess.run([sys.executable, "-m", "fedbench", *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit_files,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert_one_line_error(proc, "cannot write", "File too large", "rerun the same command")
