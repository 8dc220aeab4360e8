"""The run's final figures (summary.json, W&B summary) and the console summary."""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def summarise(run: Run, state: RunState, status: str) -> dict[str, Any]:
    t, best, last = state.totals, state.best, state.last_eval
    summary: dict[str, Any] = {
        "status": status,
        "best/val_acc": best.best_val, "best/round": best.best_round,
        "best/test_acc": best.test_at_best, "rounds_to_target": best.rounds_to_target,
        "metrics.target": best.target,
        "final/val_acc": last.get("global/val_acc"), "final/test_acc": last.get("global/test_acc"),
        "final/test_loss": last.get("global/test_loss"),
        "comm/bytes_up_total": t["bytes_up"], "comm/bytes_down_total": t["bytes_down"],
        "comm/bytes_total": t["bytes_up"] + t["bytes_down"],
        "comm/bytes_per_round": (t["bytes_up"] + t["bytes_down"]) / max(t.get("rounds_done", 0), 1),
        "time/total_s": t["time_s"],
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
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = ["fedbench summary"]
    if s.get("best/round") is not None:  # a method with a global model
        lines += [
            f"  best val acc      {num(s.get('best/val_acc'), '.4f')} (rounds-to-best: {s.get('best/round')})",
            f"  test acc at best  {num(s.get('best/test_acc'), '.4f')}",
            f"  final test acc    {num(s.get('final/test_acc'), '.4f')}",
            f"  rounds-to-target  {s.get('rounds_to_target')} (target {s.get('metrics.target')})",
        ]
    if s.get("personal/test_acc") is not None:  # clients' own models on their own test splits
        lines += [
            f"  personal test acc {num(s.get('personal/test_acc'), '.4f')} "
            f"± {num(s.get('personal/test_acc_std'), '.4f')} over clients (final)",
            f"  at best personal  {num(s.get('best/personal_test_acc'), '.4f')} "
            f"(round {s.get('best/personal_round')}, chosen on the clients' validation splits)",
        ]
    return "\n".join(lines + [
        f"  bytes up / down   {s.get('comm/bytes_up_total'):,} / {s.get('comm/bytes_down_total'):,}",
        f"  wall time         {num(s.get('time/total_s'), '.1f')} s ({s.get('executor')} on {s.get('device')})",
        f"  run dir           {s.get('run_dir')}",
    ])
