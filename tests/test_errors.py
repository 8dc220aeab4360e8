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
