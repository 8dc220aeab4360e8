"""Executors run the clients of one round with the SAME per-client functions (`ClientFns`).

`sequential` loops over clients and steps (the test oracle); `batched` maps the per-client functions
over the cohort with torch.func.vmap, in chunks of `chunk_size` clients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

from fedbench.data.clients import BatchSchedule, ClientView
from fedbench.engine.functional import Tree, tree_cat, tree_index, tree_is_empty, tree_stack, tree_where
from fedbench.engine.protocol import ClientFns

if TYPE_CHECKING:
    from fedbench.methods.base import Method


@dataclass
class RoundResult:
    uplink: Tree            # stacked [K, ...]
    client_states: Tree     # new persistent client state of the cohort, stacked [K, ...]
    loss: torch.Tensor      # [K] mean local training loss
    samples: int            # training samples processed (for throughput)
    shard: Any = None       # a Shard when this process ran only its rows of the cohort (uplink = those rows)


def _gather(view: ClientView, sched: BatchSchedule, rows: Any, s: int,
            progress: bool = False) -> dict[str, torch.Tensor]:
    idx = sched.idx[rows, s]
    flat = idx.reshape(-1)
    # index_select on a flat index is several times faster than advanced indexing with a 2-D index
    batch = {"x": torch.index_select(view.x, 0, flat).view(*idx.shape, *view.x.shape[1:]),
             "y": torch.index_select(view.y, 0, flat).view(idx.shape),
             "w": sched.weight[rows, s]}
    if sched.noise is not None:
        batch["noise"] = sched.noise[rows, s]
    if progress:  # s / (the client's number of steps): multi-phase local training (FedRep, FedeCouple)
        batch["progress"] = s / sched.step_mask[rows].sum(-1).clamp_min(1).to(sched.weight.dtype)
    return batch


class CompiledSteps:
    """torch.compile'd step functions, one graph per step function (bound methods compare equal across
    rounds); recompiles only when shapes change. Off: the function itself."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._compiled: dict[Any, Any] = {}

    def get(self, key: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
        if not self.enabled:
            return fn
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=False)
        return self._compiled[key]


def to_memory_format(tree: Tree, memory_format: torch.memory_format | None) -> Tree:
    """Every 4-D float tensor (conv weights) laid out in `memory_format`: same values, other strides. Conv,
    ReLU and max-pool outputs follow the weights, so a whole conv net then runs in that layout."""
    if memory_format is None:
        return tree
    # clone, not .contiguous(): a [32, 1, 5, 5] weight already counts as channels_last-contiguous, but
    # oneDNN reads its layout from the strides, which only a copy in that format sets
    return tree_map(lambda t: t.clone(memory_format=memory_format)
                    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() else t, tree)


def resolve_memory_format(requested: str, model: torch.nn.Module | None, device: torch.device,
                          dtype: torch.dtype) -> torch.memory_format | None:
    """hardware.memory_format -> the layout the sequential executor gives conv weights (None: as built).

    `auto` picks channels_last for 2-D conv nets on a CPU in float32: oneDNN's convolutions and max-pooling
    run natively in NHWC there (max-pool is ~10x faster than its NCHW kernel; a small CNN's step ~10%
    faster, scripts/bench.py); float64 convolutions do not go through oneDNN, and CUDA keeps its default."""
    if requested == "channels_last":
        return torch.channels_last
    if requested == "contiguous" or model is None:
        return None
    has_conv2d = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return torch.channels_last if has_conv2d and device.type == "cpu" and dtype == torch.float32 else None


class SequentialExecutor:
    name = "sequential"

    def __init__(self, compile: bool = False, memory_format: torch.memory_format | None = None):
        self.steps = CompiledSteps(compile)
        self.memory_format = memory_format

    def run(self, fns: ClientFns, down: Tree, cstates: Tree, client_ids: torch.Tensor, view: ClientView,
            sched: BatchSchedule) -> RoundResult:
        ups, news, losses = [], [], []
        progress = fns.needs_progress
        host_mask = sched.host_mask()
        step = self.steps.get(fns.step, fns.step)
        down = to_memory_format(down, self.memory_format)
        for k in range(len(client_ids)):
            cs = to_memory_format(tree_index(cstates, k), self.memory_format)  # e.g. LG-FedAvg's own conv body
            local = fns.init(down, cs, client_ids[k])
            total = torch.zeros((), dtype=sched.weight.dtype, device=sched.weight.device)
            n_steps = 0
            for s in range(sched.steps):
                if not host_mask[k, s]:
                    continue
                local, loss = step(local, down, _gather(view, sched, k, s, progress))
                total = total + loss
                n_steps += 1
            up, new_cs = fns.final(local, down, cs)
            ups.append(up)
            news.append(new_cs)
            losses.append(total / max(n_steps, 1))
        samples = int(sched.weight.sum().item())
        return RoundResult(tree_stack(ups), {} if not news or tree_is_empty(news[0]) else tree_stack(news),
                           torch.stack(losses), samples)


class BatchedExecutor:
    name = "batched"

    def __init__(self, chunk_size: int | None = None, compile: bool = False):
        self.chunk_size = chunk_size
        self.steps = CompiledSteps(compile)

    def _step_fn(self, fns: ClientFns):
        return self.steps.get(fns.step, vmap(fns.step, in_dims=(0, None, 0)))

    def run(self, fns: ClientFns, down: Tree, cstates: Tree, client_ids: torch.Tensor, view: ClientView,
            sched: BatchSchedule) -> RoundResult:
        k_total = len(client_ids)
        chunk = self.chunk_size or k_total
        init = vmap(fns.init, in_dims=(None, 0, 0))
        step = self._step_fn(fns)
        final = vmap(fns.final, in_dims=(0, None, 0))
        ups, news, losses = [], [], []
        progress = fns.needs_progress
        for start in range(0, k_total, chunk):
            rows = slice(start, min(start + chunk, k_total))
            cs = tree_index(cstates, rows)
            local = init(down, cs, client_ids[rows])
            mask_rows = sched.step_mask[rows]
            host_rows = sched.host_mask()[rows]
            total = torch.zeros(mask_rows.shape[0], dtype=sched.weight.dtype, device=sched.weight.device)
            for s in range(sched.steps):
                new_local, loss = step(local, down, _gather(view, sched, rows, s, progress))
                if host_rows[:, s].all():  # every client has a real step: no masking needed
                    local = new_local
                    total = total + loss
                else:
                    m = mask_rows[:, s]
                    local = tree_where(m, new_local, local)
                    total = total + torch.where(m, loss, torch.zeros_like(loss))
            up, new_cs = final(local, down, cs)
            ups.append(up)
            news.append(new_cs)
            losses.append(total / mask_rows.sum(1).clamp_min(1).to(total.dtype))
        samples = int(sched.weight.sum().item())
        return RoundResult(tree_cat(ups), {} if not news or tree_is_empty(news[0]) else tree_cat(news),
                           torch.cat(losses), samples)


Executor = SequentialExecutor | BatchedExecutor


def pick_executor(requested: str, method: Method, model: torch.nn.Module | None, device: torch.device,
                  chunk_size: int | None, compile: bool = False, policy: str = "heuristic",
                  trial: Callable[[Executor], Any] | None = None,
                  memory_format: torch.memory_format | None = None) -> tuple[Executor, str]:
    """Return (executor, reason).

    `auto` with policy `heuristic` follows measurements on a 2-core CPU (README, Performance: vmap wins
    for small dense models and on GPUs; on a CPU conv nets are already compute-bound). Policy `timed`
    runs `trial(executor)` (one round whose result is thrown away) with each executor and keeps the faster.
    """
    if requested == "sequential" or not method.batchable:
        why = "requested" if requested == "sequential" else f"method {method.name} is sequential-only"
        return SequentialExecutor(compile, memory_format), why
    if requested == "batched":
        return BatchedExecutor(chunk_size, compile), "requested"
    if policy == "timed" and trial is not None:
        import time

        timings = {}
        candidates = [SequentialExecutor(compile, memory_format), BatchedExecutor(chunk_size, compile)]
        for ex in candidates:
            trial(ex)  # warm-up (and compilation)
            t0 = time.perf_counter()
            trial(ex)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings[ex.name] = time.perf_counter() - t0
        best = min(candidates, key=lambda e: timings[e.name])
        return best, "auto (timed one round: " + ", ".join(f"{k} {v:.3f}s" for k, v in timings.items()) + ")"
    if method.prefers_sequential:
        return (SequentialExecutor(compile, memory_format),
                f"auto: method {method.name} (padding to the longest client would waste compute)")
    has_conv = model is not None and any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    if device.type == "cuda":
        return BatchedExecutor(chunk_size, compile), "auto: CUDA device"
    if has_conv:
        return SequentialExecutor(compile, memory_format), "auto: conv net on CPU (compute-bound, vmap measured slower)"
    return BatchedExecutor(chunk_size, compile), "auto: dense model on CPU (per-step overhead dominates)"
