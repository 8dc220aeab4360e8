"""A fused group: several runs of one sweep, round by round in one process, their clients as one
computation (fedbench.engine.fused). Each run keeps everything a separate run has: its own Run (run dir,
method object, state, callbacks: evaluation, sinks, W&B, checkpoint), built and ended by the same code;
only the clients' work of a round is shared. A run that diverges, fails or is stopped leaves the group
after that round (its summary says why); the others go on with the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedbench.engine.executors import BatchedExecutor
from fedbench.engine.functional import tree_index
from fedbench.engine.fused import RunRound, run_fused_clients, run_values
from fedbench.errors import Preempted
from fedbench.run.build import Run, build_run
from fedbench.run.callbacks import Callback, RunEnd, build_callbacks
from fedbench.run.evaluation import evaluate_global_runs, global_eval_due
from fedbench.run.lock import run_dir_lock
from fedbench.run.loop import (
    RoundOutput,
    close_round,
    end_run,
    finish_round,
    one_line,
    run_round,
    start_run,
    status_of,
    synchronize,
)
from fedbench.run.validation import validate

log = logging.getLogger("fedbench")


@dataclass
class Outcome:
    """How one job of the group ended: its summary, and the error that ended it (None: completed)."""

    summary: dict[str, Any]
    error: BaseException | None = None


def open_run(cfg: DictConfig, run_dir: Path, sweep_group: str | None,
             locks: contextlib.ExitStack) -> Run | dict[str, Any]:
    """A job's Run, fresh or resumed from its run dir's checkpoint (the run dir held until the group
    ends), or the summary of a job that had finished already: what `run_experiment` does before the
    rounds, for one process."""
    from fedbench.experiment import resolve_resume

    started = time.perf_counter()
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    locks.enter_context(run_dir_lock(run_dir, "hydra.sweep.dir"))
    target, checkpoint, finished = resolve_resume(cfg, run_dir)
    if finished is not None:
        return finished
    if target != run_dir:
        locks.enter_context(run_dir_lock(target, "hydra.sweep.dir"))
    run = build_run(cfg, target, checkpoint, sweep_group)
    run.created = started
    return run


def fusable(runs: Sequence[Run]) -> str | None:
    """None when the runs' clients can run as one computation; else why not (one line)."""
    method = runs[0].method
    if not method.fusable:
        return f"method {method.name} does not declare itself fusable"
    if not all(isinstance(r.executor, BatchedExecutor) for r in runs):
        return "the runs use the sequential executor (hardware.executor / auto's choice for this model and device)"
    return None


def run_group(runs: list[Run], callbacks: list[list[Callback]] | None = None) -> list[Outcome]:
    """Every run of the group to its end, round by round; one Outcome per run, in order."""
    callbacks = callbacks if callbacks is not None else [build_callbacks(r.cfg, None) for r in runs]
    outcomes: dict[int, Outcome] = {}
    why_not = fusable(runs) if len(runs) > 1 else "one run"
    if why_not is not None and len(runs) > 1:
        log.info("fused group of %d runs: clients run per run (%s)", len(runs), why_not)
    elif why_not is None:
        log.info("fused group of %d runs: their clients run as one computation", len(runs))
        for run in runs:
            run.fused_runs = len(runs)
    active: list[int] = []
    for i, run in enumerate(runs):
        try:
            start_run(run, callbacks[i])
            active.append(i)
        except Exception as e:  # noqa: BLE001 - one job's failure never stops the others
            outcomes[i] = _end(run, callbacks[i], e)
    first = min((runs[i].state.round for i in active), default=0)
    try:
        for r in range(first + 1, (runs[0].rounds if runs else 0) + 1):
            members = [i for i in active if runs[i].state.round == r - 1]
            if not members:
                continue
            for i, error in _round(runs, callbacks, members, r, why_not is None).items():
                active.remove(i)
                outcomes[i] = error
            if not active:
                break
    except BaseException as e:  # interrupted (KeyboardInterrupt) or a failure of the shared round
        for i in active:
            outcomes[i] = _end(runs[i], callbacks[i], e)
        active = []
        if not isinstance(e, Exception):
            raise
    for i in active:
        outcomes[i] = Outcome(end_run(runs[i], RunEnd(), callbacks[i]))
    return [outcomes[i] for i in range(len(runs))]


def _evaluate_together(runs: list[Run], members: list[int], outs: list[Any], r: int) -> None:
    """The global models of the members due for evaluation, in one batched pass over the data; each
    run's evaluation callback then takes its own figures (`Run.evaluated`)."""
    due = [(runs[i], out) for i, out in zip(members, outs, strict=True)
           if not isinstance(out, Exception) and global_eval_due(runs[i], r)]
    method = runs[members[0]].method
    dataset = runs[members[0]].dataset
    if len(due) < 2 or not (method.uses_backbone and method.predicts_with_backbone) or \
            not all(run.dataset.x_val is dataset.x_val and run.dataset.x_test is dataset.x_test for run, _ in due):
        return
    figures = evaluate_global_runs([run.method for run, _ in due], [out.gstate for _, out in due], dataset)
    for (run, _), pair in zip(due, figures, strict=True):
        run.evaluated = (r, pair)


def _end(run: Run, callbacks: Sequence[Callback], error: BaseException) -> Outcome:
    end = RunEnd(status_of(error), reason=one_line(error))
    try:
        return Outcome(end_run(run, end, callbacks), error)
    except Exception as e:  # noqa: BLE001 - the summary itself failed (e.g. a full disk)
        return Outcome({"status": end.status, "reason": end.reason}, e)


def _round(runs: list[Run], callbacks: list[list[Callback]], members: list[int], r: int,
           fused: bool) -> dict[int, Outcome]:
    """Round r of `members`; returns the outcomes of the runs that ended with it."""
    t0 = time.perf_counter()
    plans = []
    for i in members:
        run = runs[i]
        run.method.lr = run.lr_at(r)
        ctx, sched = run.schedule_round(r)
        plans.append((ctx, sched, run.method.broadcast(run.state.gstate, ctx)))
    if fused:
        template = runs[members[0]].method
        parts = [RunRound(down.tensors, tree_index(runs[i].state.cstates, ctx.cohort), ctx.cohort, runs[i].view,
                          sched, run_values(runs[i].method, runs[i].method.lr, runs[i].dtype, runs[i].device))
                 for i, (ctx, sched, down) in zip(members, plans, strict=True)]
        results = run_fused_clients(template, template.client_fns(plans[0][0]), parts)

    def server(k: int) -> RoundOutput:
        i, (ctx, sched, down) = members[k], plans[k]
        if fused:
            return close_round(runs[i].method, runs[i].state.gstate, down, results[k], ctx)
        return run_round(runs[i].method, runs[i].executor, runs[i].state.gstate, runs[i].state.cstates, ctx,
                         runs[i].view, sched)

    outs: list[RoundOutput | Exception] = []
    for k in range(len(members)):
        try:
            outs.append(server(k))
        except Exception as e:  # noqa: BLE001 - this run's own step failed: it alone leaves the group
            outs.append(e)
    if fused:
        _evaluate_together(runs, members, outs, r)
    synchronize(runs[members[0]].device)
    seconds = (time.perf_counter() - t0) / len(members)  # the group's round time, shared equally
    ended: dict[int, Outcome] = {}
    for i, (ctx, _, _), out in zip(members, plans, outs, strict=True):
        run = runs[i]
        try:
            if isinstance(out, Exception):
                raise out
            stopper = finish_round(run, callbacks[i], ctx, out, seconds)
        except Exception as e:  # noqa: BLE001 - diverged, preempted or failed: this run leaves the group
            if not isinstance(e, Preempted):
                log.warning("fused group: %s left at round %d: %s", run.run_dir, r, one_line(e))
            ended[i] = _end(run, callbacks[i], e)
            continue
        if stopper is not None:
            ended[i] = Outcome(end_run(run, RunEnd("completed", *stopper), callbacks[i]))
    return ended
