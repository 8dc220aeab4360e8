"""The run's final figures (summary.json, W&B summary) and the console summary."""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def summarise(run: Run, state: RunState, status: str, reason: str | None = None) -> dict[str, Any]:
    t, best, last = state.totals, state.best, state.last_eval
    summary: dict[str, Any] = {
        "status": status,
        **({"reason": reason} if reason else {}),
        "best/val_acc": best.best_val, "best/round": best.best_round,
        "best/test_acc": best.test_at_best, "rounds_to_target": best.rounds_to_target,
        "metrics.target": best.target,
        "final/val_acc": last.get("global/val_acc"), "final/test_acc": last.get("global/test_acc"),
        "final/test_loss": last.get("global/test_loss"),
        "comm/bytes_up_total": t["bytes_up"], "comm/bytes_down_total": t["bytes_down"],
        "comm/bytes_total": t["bytes_up"] + t["bytes_down"],
        "comm/bytes_per_round": (t["bytes_up"] + t["bytes_down"]) / max(t.get("rounds_done", 0), 1),
        "time/total_s": t["time_s"],          # the rounds' own time, all processes of a resumed run
        "time/startup_s": run.startup_s,      # this process: data, model, warm start, sinks
        "time/wall_s": time.perf_counter() - run.created,  # this process, start to end
        "throughput/samples_per_s": t["samples"] / t["time_s"] if t["time_s"] else None,
        "memory/peak_rss_mb": peak_rss_mb(),
        "memory/peak_device_mb": (torch.cuda.max_memory_allocated(run.device) / 2**20
                                  if run.device.type == "cuda" else None),
        "rounds": run.rounds,
        "n_params": sum(v.numel() for v in run.method.model_tensors(state.gstate).values()),
        "executor": run.executor.name, "device": str(run.device),
        "run_dir": str(run.run_dir),
    }
    summary.update({k: v for k, v in last.items() if k.startswith(("sparsity/", "personal/"))})
    if state.best_personal.best_round is not None:
        summary.update({"best/personal_val_acc": state.best_personal.best_val,
                        "best/personal_round": state.best_personal.best_round,
                        "best/personal_test_acc": state.best_personal.test_at_best})
    summary.update(run.provenance)
    if run.dataset.task == "regression":
        summary.update({"best/val_r2": summary.pop("best/val_acc"), "best/test_r2": summary.pop("best/test_acc"),
                        "final/test_mse": last.get("global/test_mse"), "final/test_r2": last.get("global/test_r2")})
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The console summary: the task's own metrics, lines that do not apply left out."""
    def num(key: str, fmt: str = ".4f") -> str:
        v = s.get(key)
        return "n/a" if v is None else format(v, fmt)

    lines = [f"fedbench summary ({s.get('status', 'completed')})"]
    if s.get("best/val_r2") is not None:  # regression
        lines += [f"  best val R^2      {num('best/val_r2')} (rounds-to-best: {s.get('best/round')})",
                  f"  test R^2 at best  {num('best/test_r2')}",
                  f"  final test MSE    {num('final/test_mse', '.4g')} (R^2 {num('final/test_r2')})"]
    elif s.get("best/round") is not None:  # a classifier with a global model
        lines += [f"  best val acc      {num('best/val_acc')} (rounds-to-best: {s.get('best/round')})",
                  f"  test acc at best  {num('best/test_acc')}",
                  f"  final test acc    {num('final/test_acc')}"]
    if s.get("best/round") is not None and s.get("metrics.target") is not None:
        reached = s.get("rounds_to_target")
        lines.append(f"  rounds-to-target  {reached if reached is not None else 'not reached'} "
                     f"(target {s.get('metrics.target')})")
    if s.get("sparsity/density") is not None:
        nnz, n = s.get("sparsity/nnz"), s.get("sparsity/n_gated")
        lines.append(f"  density           {num('sparsity/density', '.5f')} ({nnz:,} of {n:,} gated entries)")
    if s.get("sparsity/tdr") is not None:
        lines.append(f"  TDR               {num('sparsity/tdr')} (recall {num('sparsity/recall')}, "
                     f"F1 {num('sparsity/f1')})")
    if s.get("personal/test_acc") is not None:  # clients' own models on their own test splits
        lines += [f"  personal test acc {num('personal/test_acc')} ± {num('personal/test_acc_std')} over clients "
                  f"(final)",
                  f"  at best personal  {num('best/personal_test_acc')} (round {s.get('best/personal_round')}, "
                  f"chosen on the clients' validation splits)"]
    if s.get("reason"):
        lines.append(f"  reason            {s['reason']}")
    return "\n".join(lines + [
        f"  bytes up / down   {s.get('comm/bytes_up_total', 0):,} / {s.get('comm/bytes_down_total', 0):,}",
        f"  time              {num('time/total_s', '.1f')} s of rounds + {num('time/startup_s', '.1f')} s start-up "
        f"({s.get('executor')} on {s.get('device')})",
        f"  run dir           {s.get('run_dir')}",
    ])
