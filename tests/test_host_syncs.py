"""GPU-ready without a GPU: the number of host synchronisations (`.item()` / `float(tensor)`, i.e.
aten._local_scalar_dense, and device-to-host copies) in one round does not grow with the number of
local steps or the cohort size, for both executors."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import compose_cfg
from fedbench.run.build import build_run
from fedbench.run.loop import run_round


class CountHostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            to_host = kwargs.get("device") == torch.device("cpu") or (
                func is torch.ops.aten.copy_.default and args[0].device.type == "cpu")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and to_host:
                self.count += 1
        return func(*args, **kwargs)


def syncs_in_one_round(tmp_path, method: str, executor: str, steps: int, clients: int) -> int:
    overrides = ["dataset=digits", "backbone=mlp", "backbone.hidden=[16]", f"clients={clients}", "participation=1.0",
                 f"local_steps={steps}", "batch_size=8", "hardware=cpu", f"hardware.executor={executor}",
                 f"method={method}", "logger=local", "progress=false", "rounds=2"]
    if method == "fedrep":
        overrides.append("partition=noniid_s")
    if method == "flops":
        overrides.append("method.prune_start=1")
    run_dir = tmp_path / f"{method}-{executor}-{steps}-{clients}"
    run_dir.mkdir()
    run = build_run(compose_cfg(overrides), run_dir)
    ctx, sched = run.prepare_round(1)
    with CountHostSyncs() as counter:
        run_round(run.method, run.executor, run.state.gstate, run.state.cstates, ctx, run.view, sched)
    return counter.count


@pytest.mark.parametrize("executor", ["sequential", "batched"])
@pytest.mark.parametrize("method", ["fedavg", "scaffold", "flops", "fedrep"])
def test_host_syncs_per_round_do_not_grow_with_steps_or_clients(tmp_path, method, executor):
    base = syncs_in_one_round(tmp_path, method, executor, steps=2, clients=5)
    assert syncs_in_one_round(tmp_path, method, executor, steps=6, clients=5) == base  # 3x the local steps
    assert syncs_in_one_round(tmp_path, method, executor, steps=2, clients=10) == base  # 2x the cohort
    assert base <= 2, base  # a constant: the round's sample count
