"""Device checks that `scripts/gpu_check.sh` runs on a GPU (FEDBENCH_TEST_DEVICE=cuda) and the suite runs
on the CPU: batched == sequential in float64, bfloat16 with BatchNorm in the batched executor, two ranks
sharing one device == one process, CUDA's speed switches."""

import os

import pytest
import torch

from conftest import compose_cfg
from fedbench.experiment import run_experiment

DEVICE = os.environ.get("FEDBENCH_TEST_DEVICE", "cpu")
needs_device = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                  reason="FEDBENCH_TEST_DEVICE=cuda but torch sees no GPU")
SMALL = ["dataset=digits", "clients=6", "participation=0.5",
         "rounds=2", "batch_size=16", f"hardware.device={DEVICE}", "logger=local", "progress=false",
         "checkpoint_every=1", "hardware.dtype=float64", "local_epochs=2", "partition.alpha=0.3"]
MLP = ["backbone=mlp", "backbone.hidden=[16]"]


def final(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")


def worst_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)


@needs_device
@pytest.mark.parametrize("method", ["fedavg", "scaffold"])
def test_batched_equals_sequential_float64_on_the_device(tmp_path, method):
    out = {}
    for ex in ("sequential", "batched"):
        run_experiment(compose_cfg(SMALL + MLP + [f"method={method}", f"hardware.executor={ex}"]), tmp_path / ex)
        out[ex] = final(tmp_path / ex)["gstate"]["params"]
    assert worst_rel(out["sequential"], out["batched"]) <= 1e-10


@needs_device
def test_bfloat16_batchnorm_in_the_batched_executor_on_the_device(tmp_path):
    cfg = SMALL + ["backbone=resnet18", "backbone.norm=batch", "backbone.width=8", "hardware.dtype=bfloat16",
                   "hardware.executor=batched", "rounds=1", "local_steps=2", "clients=4", "local_epochs=1"]
    summary = run_experiment(compose_cfg(cfg), tmp_path / "bf16")
    assert summary["status"] == "completed"
    params = final(tmp_path / "bf16")["gstate"]["params"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in params.values())


@needs_device
def test_two_ranks_sharing_the_device_equal_one_process(tmp_path):
    one = run_experiment(compose_cfg(SMALL + MLP + ["method=fedavg"]), tmp_path / "one")
    two = run_experiment(compose_cfg(SMALL + MLP + ["method=fedavg", "hardware.workers=2"]), tmp_path / "two")
    assert one["comm/bytes_total"] == two["comm/bytes_total"]
    assert worst_rel(final(tmp_path / "one")["gstate"]["params"],
                     final(tmp_path / "two")["gstate"]["params"]) <= 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_hardware_cuda_turns_on_tf32_and_cudnn_benchmark(tmp_path):
    small = [o for o in SMALL if not o.startswith("hardware.device")]
    run_experiment(compose_cfg(small + MLP + ["hardware=cuda", "hardware.dtype=float32"]), tmp_path / "on")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    run_experiment(compose_cfg(small + MLP + ["hardware=cuda", "hardware.tf32=false", "hardware.dtype=float32"]),
                   tmp_path / "off")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32

