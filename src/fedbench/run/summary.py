"""The run's final figures (summary.json, W&B summary) and the console summary."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedbench.metrics import names

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.callbacks import Callback, RunEnd
    from fedbench.run.state import RunState


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def summarise(run: Run, state: RunState, end: RunEnd, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """summary.json: how the run ended, every metric's last value (the method's own too), what each
    callback adds (best/* from evaluation), the final global metrics, totals, time and memory."""
    t, last = state.totals, state.last
    summary: dict[str, Any] = {"status": end.status}
    if end.stopped_by:
        summary["stopped_by"] = end.stopped_by
    if end.reason:
        summary["reason"] = end.reason
    summary.update(last)
    for cb in callbacks:
        summary.update(cb.summary(run, state))
    task = run.dataset.task
    finals = names.final_metrics(task)
    summary.update({names.final(split, k): last.get(names.global_metric(split, k))
                    for split in ("val", "test") for k in finals})
    summary.update({
        names.BYTES_UP_TOTAL: t["bytes_up"], names.BYTES_DOWN_TOTAL: t["bytes_down"],
        names.BYTES_TOTAL: t["bytes_up"] + t["bytes_down"],
        names.BYTES_PER_ROUND: (t["bytes_up"] + t["bytes_down"]) / max(t.get("rounds_done", 0), 1),
        names.CLIENT_STEPS_TOTAL: t.get("client_steps", 0),
        names.TOTAL_S: t["time_s"],           # the rounds' own time, all processes of a resumed run
        names.STARTUP_S: run.startup_s,       # this process: data, model, warm start, sinks
        names.WALL_S: time.perf_counter() - run.created,  # this process, start to end
        names.SAMPLES_PER_S: t["samples"] / t["time_s"] if t["time_s"] else None,
        names.PEAK_RSS_MB: peak_rss_mb(),
        names.PEAK_DEVICE_MB: (torch.cuda.max_memory_allocated(run.device) / 2**20
                               if run.device.type == "cuda" else None),
        "rounds": run.rounds,
        "rounds_done": state.round,
        "n_params": sum(v.numel() for v in run.method.model_tensors(state.gstate).values()),
        "executor": run.executor.name, "device": str(run.device), "fused_runs": run.fused_runs,
        "run_dir": str(run.run_dir),
    })
    # per-round figures: the totals say more
    for k in (names.ROUND_S, names.BYTES_UP, names.BYTES_DOWN, names.CLIENT_STEPS):
        summary.pop(k, None)
    summary.update(run.provenance)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The console summary: the task's own metrics, lines that do not apply left out."""
    def num(key: str, fmt: str = ".4f") -> str:
        v = s.get(key)
        return "n/a" if v is None else format(v, fmt)

    lines = [f"fedbench summary ({s.get('status', 'completed')})"]
    scored = [t for t in names.TASKS if s.get(names.best_val(t)) is not None]
    if scored and s.get(names.BEST_ROUND) is not None:  # a global model chosen on validation
        task = scored[0]
        label = {"regression": "R^2", "multilabel": "F1"}.get(task, "acc")
        final = f"acc    {num(names.final('test', 'acc'))}"
        if task == "regression":
            final = f"MSE    {num(names.final('test', 'mse'), '.4g')} (R^2 {num(names.final('test', 'r2'))})"
        if task == "multilabel":
            final = (f"F1     {num(names.final('test', 'f1'))} (micro over labels; Hamming acc "
                     f"{num(names.final('test', 'hamming_acc'))})")
        lines += [f"  {'best val ' + label:<18}{num(names.best_val(task))} (rounds-to-best: {s.get(names.BEST_ROUND)})",
                  f"  {'test ' + label + ' at best':<18}{num(names.best_test(task))}",
                  f"  final test {final}"]
    elif s.get(names.final("test", "acc")) is not None:  # no validation set: nothing was selected
        lines.append(f"  final test acc    {num(names.final('test', 'acc'))} (no validation set)")
    if s.get(names.BEST_ROUND) is not None and s.get(names.TARGET) is not None:
        reached = s.get(names.ROUNDS_TO_TARGET)
        lines.append(f"  rounds-to-target  {reached if reached is not None else 'not reached'} "
                     f"(target {s.get(names.TARGET)})")
    if s.get(names.DENSITY) is not None:
        nnz, n = s.get(names.NNZ), s.get(names.N_GATED)
        lines.append(f"  density           {num(names.DENSITY, '.5f')} ({nnz:,} of {n:,} gated entries)")
    if s.get(names.TDR) is not None:
        lines.append(f"  TDR               {num(names.TDR)} (recall {num('sparsity/recall')}, "
                     f"F1 {num('sparsity/f1')})")
    if s.get(names.PERSONAL_TEST_ACC) is not None:  # clients' own models on their own test splits
        lines += [f"  personal test acc {num(names.PERSONAL_TEST_ACC)} ± {num(names.personal('test', 'std'))} "
                  f"over clients (final)",
                  f"  at best personal  {num(names.BEST_PERSONAL_TEST_ACC)} (round {s.get(names.BEST_PERSONAL_ROUND)}, "
                  f"chosen on the clients' validation splits)"]
    if s.get("reason"):
        lines.append(f"  reason            {s['reason']}")
    return "\n".join(lines + [
        f"  bytes up / down   {s.get('comm/bytes_up_total', 0):,} / {s.get('comm/bytes_down_total', 0):,}",
        f"  time              {num('time/total_s', '.1f')} s of rounds + {num('time/startup_s', '.1f')} s start-up "
        f"({s.get('executor')} on {s.get('device')})",
        f"  run dir           {s.get('run_dir')}",
    ])
