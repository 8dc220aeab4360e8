"""The round loop, on one screen. ONE `run_round` serves the loop, the timed `auto` executor and the
benchmark; everything around the FL core (evaluation, sinks, checkpoints, divergence) is a callback."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedbench.data.clients import BatchSchedule, ClientView
from fedbench.engine.functional import tree_index
from fedbench.engine.protocol import RoundContext
from fedbench.errors import ConfigError, DivergedError, Preempted
from fedbench.metrics import names
from fedbench.metrics.comm import Payload, payload_bytes

if TYPE_CHECKING:
    from fedbench.engine.executors import Executor, RoundResult
    from fedbench.methods.base import Method
    from fedbench.run.build import Run
    from fedbench.run.callbacks import Callback
    from fedbench.run.state import RunState


@dataclass
class RoundOutput:
    gstate: dict[str, Any]          # the server state after aggregation
    client_states: dict[str, Any]   # the cohort's new client states, stacked [K, ...]
    loss: torch.Tensor              # [K] mean local training loss per client
    samples: int                    # training samples processed
    bytes_up: int
    bytes_down: int
    metrics: dict[str, Any]         # the method's own per-round metrics (from aggregate)
    padding_factor: float = 1.0     # client-steps computed / client-steps with data
    client_steps: int = 0           # local minibatch steps with data, summed over the cohort


def run_round(method: Method, executor: Executor, gstate: dict[str, Any], cstates: dict[str, Any],
              ctx: RoundContext, view: ClientView, sched: BatchSchedule) -> RoundOutput:
    """broadcast -> clients (executor) -> aggregate; bytes counted from the real payloads."""
    down = method.broadcast(gstate, ctx)
    if len(ctx.cohort) == 0:
        return empty_round(method, gstate, cstates, down, ctx)
    res = executor.run(method.client_fns(ctx), down.tensors, tree_index(cstates, ctx.cohort), ctx.cohort, view,
                       sched)
    return close_round(method, gstate, down, res, ctx)


def close_round(method: Method, gstate: dict[str, Any], down: Payload, res: RoundResult,
                ctx: RoundContext) -> RoundOutput:
    """The server's half of a round, after the clients' results (`res`) arrived: aggregate, then the
    server's change to the cohort's client states; bytes counted from the real payloads."""
    new_gstate, metrics, bytes_up, up = server_step(method, gstate, res, ctx)
    bytes_down = payload_bytes(down) * (len(ctx.cohort) + ctx.dropped)  # dropped clients got it too
    client_states = res.client_states
    if up is not None:  # the server may change the cohort's client states (sent to each of them)
        client_states, sent = method.personalize(new_gstate, client_states, up, ctx)
        bytes_down += payload_bytes(sent) if sent is not None else 0
    return RoundOutput(new_gstate, client_states, res.loss, res.samples, bytes_up, bytes_down, metrics,
                       res.padding_factor, res.client_steps)


def empty_round(method: Method, gstate: dict[str, Any], cstates: dict[str, Any], down: Payload,
                ctx: RoundContext) -> RoundOutput:
    """A round in which no update arrives (nobody available, or every sampled client dropped): the
    server state stays as it is; the dropped clients' downlink is counted."""
    loss = torch.zeros(0, dtype=ctx.sizes.dtype, device=ctx.sizes.device)
    return RoundOutput(gstate, tree_index(cstates, ctx.cohort), loss, 0, 0, payload_bytes(down) * ctx.dropped, {})


def server_step(method: Method, gstate: dict[str, Any], res: RoundResult,
                ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any], int, dict[str, Any] | None]:
    """(new global state, the method's metrics, uplink bytes, the cohort's uplinks or None when reduced).
    A cohort sharded over ranks (`res.shard`): a method that aggregates by weighted means gets the ranks'
    shares summed (one model-sized all-reduce), any other every client's uplink gathered in cohort order;
    bytes are counted per rank and summed."""
    shard = res.shard
    if shard is None:
        return (*method.aggregate(gstate, res.uplink, ctx), payload_bytes(method.uplink(res.uplink)), res.uplink)
    bytes_up = shard.sum_int(payload_bytes(method.uplink(res.uplink)))
    if method.aggregates_by_shares:
        reduced = shard.sum(method.uplink_share(res.uplink, ctx, shard.rows))
        return (*method.aggregate_shares(gstate, reduced, ctx), bytes_up, None)
    up = shard.gather(res.uplink)
    return (*method.aggregate(gstate, up, ctx), bytes_up, up)


def run_rounds(run: Run, callbacks: Sequence[Callback]) -> dict[str, Any]:
    """Rounds state.round + 1 .. R; returns the summary. A callback asking to stop ends the run after the
    round (on every rank alike); `on_end` learns why the run ended."""
    from fedbench.run.callbacks import RunEnd

    start_run(run, callbacks)
    end = RunEnd()
    try:
        upcoming = None
        for r in range(run.state.round + 1, run.rounds + 1):
            t0 = time.perf_counter()
            run.method.lr = run.lr_at(r)
            ctx, sched = upcoming if upcoming is not None else run.schedule_round(r)
            out = run_round(run.method, run.executor, run.state.gstate, run.state.cstates, ctx, run.view, sched)
            # the next round's cohort and schedule are host work: on a GPU they overlap the device's
            # queued kernels of this round (they depend on the seed, round and config only)
            upcoming = run.schedule_round(r + 1) if r < run.rounds else None
            synchronize(run.device)  # the round's time includes the device's work
            stopper = finish_round(run, callbacks, ctx, out, time.perf_counter() - t0)
            if run.world.any(stopper is not None):  # rank 0 alone may evaluate: every rank stops with it
                end = RunEnd("completed", *(stopper or ("another rank", None)))
                break
    except BaseException as e:
        end = RunEnd(status_of(e), reason=one_line(e))
        raise
    finally:
        summary = end_run(run, end, callbacks)
    return summary


def start_run(run: Run, callbacks: Sequence[Callback]) -> None:
    """The callbacks start (with their checkpointed state on a resume); start-up time ends here."""
    state = run.state
    for cb in callbacks:
        if cb.name in state.callbacks:
            cb.load_state_dict(state.callbacks[cb.name])
        cb.on_start(run, state)
        state.callbacks[cb.name] = cb.state_dict()
    run.startup_s = time.perf_counter() - run.created


def finish_round(run: Run, callbacks: Sequence[Callback], ctx: RoundContext, out: RoundOutput,
                 seconds: float) -> tuple[str, str] | None:
    """The state after the round, then the callbacks (evaluation, sinks, checkpoint); returns the
    (callback, reason) that asks to stop, or None. A callback may raise (divergence, preemption)."""
    run.state = run.state.advance(ctx.round, ctx.cohort, out.gstate, out.client_states, out.bytes_up,
                                  out.bytes_down, out.samples, seconds, out.client_steps)
    return after_round(run, run.state, callbacks, round_row(run, run.state, out, seconds))


def end_run(run: Run, end: Any, callbacks: Sequence[Callback]) -> dict[str, Any]:
    """The summary of a run that ended (`end`: RunEnd), handed to every callback's `on_end`."""
    from fedbench.run.summary import summarise

    summary = summarise(run, run.state, end, callbacks)
    for cb in callbacks:
        cb.on_end(run, run.state, summary, end)
    return summary


def after_round(run: Run, state: RunState, callbacks: Sequence[Callback],
                row: dict[str, Any]) -> tuple[str, str] | None:
    """Each callback sees the row with the metrics of those before it; their states are kept for the
    checkpoint as they change (the checkpoint callback comes last). A callback's `stop` is True or its
    reason; returns (callback name, reason) of the first one that asks to stop."""
    stopper = None
    state.last.update({k: v for k, v in row.items() if k != names.ROUND})
    for cb in callbacks:
        stop, metrics = cb.after_round(run, state, row)
        row.update(metrics)
        state.last.update(metrics)
        state.callbacks[cb.name] = cb.state_dict()
        if stop and stopper is None:
            stopper = (cb.name, stop if isinstance(stop, str) else f"{cb.name} asked to stop")
    return stopper


def round_row(run: Run, state: RunState, out: RoundOutput, seconds: float) -> dict[str, Any]:
    """The round's metrics before evaluation: participants, bytes, loss, the method's own, time."""
    t = state.totals
    row: dict[str, Any] = {
        names.ROUND: state.round, names.PARTICIPANTS: len(out.loss),
        names.BYTES_UP: out.bytes_up, names.BYTES_DOWN: out.bytes_down,
        names.BYTES_UP_TOTAL: t["bytes_up"], names.BYTES_DOWN_TOTAL: t["bytes_down"],
        names.BYTES_TOTAL: t["bytes_up"] + t["bytes_down"],
    }
    if run.method.reports_train_loss and len(out.loss):
        row[names.TRAIN_LOSS] = float(out.loss.mean())  # the round's one host sync for the loss
    if run.lr_schedule.name != "constant":
        row[names.TRAIN_LR] = run.lr_at(state.round)
    row.update({k: float(v) if isinstance(v, torch.Tensor) else v for k, v in out.metrics.items()})
    row[names.ROUND_S] = seconds
    row[names.TOTAL_S] = t["time_s"]
    row[names.SAMPLES_PER_S] = out.samples / seconds if seconds > 0 else None
    row[names.PADDING_FACTOR] = out.padding_factor
    row[names.CLIENT_STEPS] = out.client_steps
    return row


def status_of(e: BaseException) -> str:
    if isinstance(e, DivergedError):
        return "diverged"
    if isinstance(e, Preempted):
        return "preempted"
    if isinstance(e, Exception):
        return "failed"
    return "interrupted"  # KeyboardInterrupt, SystemExit


def one_line(e: BaseException) -> str:
    """The first line of an error; fedbench's own errors speak for themselves, others get their type."""
    text = str(e).strip().splitlines()
    if isinstance(e, (ConfigError, DivergedError, Preempted)) and text:
        return text[0]
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
