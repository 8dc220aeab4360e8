"""Executors run the clients of one round with the SAME per-client functions (`ClientFns`).

`sequential` loops over clients and steps (the test oracle); `batched` maps the per-client functions
over the cohort with torch.func.vmap, in groups of clients with similar numbers of local steps
(`length_buckets`: every group runs to its own longest client, not the cohort's), at most `chunk_size`
clients per group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
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
    padding_factor: float = 1.0  # client-steps computed / client-steps with data (masked steps are waste)
    client_steps: int = 0        # local minibatch steps with data, summed over the cohort (the budget spent)


def _gather(view: ClientView, sched: BatchSchedule, rows: Any, s: int,
            progress: bool = False) -> dict[str, torch.Tensor]:
    idx = sched.idx[rows, s]
    flat = idx.reshape(-1)
    # index_select on a flat index is several times faster than advanced indexing with a 2-D index
    batch = {"x": torch.index_select(view.x, 0, flat).view(*idx.shape, *view.x.shape[1:]),
             "y": torch.index_select(view.y, 0, flat).view(*idx.shape, *view.y.shape[1:]),
             "w": sched.weight[rows, s]}
    if sched.noise is not None:
        batch["noise"] = sched.noise[rows, s]
    if progress:  # s / (the client's number of steps): multi-phase local training (FedRep, FedeCouple)
        batch["progress"] = s / sched.step_mask[rows].sum(-1).clamp_min(1).to(sched.weight.dtype)
    return batch


class CompiledSteps:
    """torch.compile'd step functions, one graph per step function (bound methods compare equal across
    rounds); recompiles only when shapes change. Off: the function itself."""

    def __init__(self, enabled: bool, mode: str | None = None, dynamic: bool | None = False):
        self.enabled, self.mode, self.dynamic = enabled, mode, dynamic
        self._compiled: dict[Any, Any] = {}

    def get(self, key: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
        if not self.enabled:
            return fn
        if key not in self._compiled:
            # mode: None (default), reduce-overhead (CUDA graphs), max-autotune
            self._compiled[key] = torch.compile(fn, dynamic=self.dynamic, mode=self.mode)
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

    `auto` picks channels_last for 2-D conv nets in float32 (bfloat16 runs keep float32 master weights):
    on a CPU oneDNN's convolutions and max-pooling run natively in NHWC (max-pool is ~10x faster than
    its NCHW kernel; a small CNN's step ~10% faster, scripts/bench.py); on CUDA cuDNN's tensor-core
    kernels (TF32, bfloat16) are NHWC kernels. float64 convolutions use neither: they keep the default."""
    if requested == "channels_last":
        return torch.channels_last
    if requested == "contiguous" or model is None:
        return None
    has_conv2d = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    fast_layout = device.type in ("cpu", "cuda") and dtype == torch.float32
    return torch.channels_last if has_conv2d and fast_layout else None


def step_counts(sched: BatchSchedule) -> np.ndarray:
    """[K] local steps of each cohort client: one past its last real step (the mask is a prefix)."""
    mask = sched.host_mask()
    if mask.shape[1] == 0:
        return np.zeros(mask.shape[0], dtype=np.int64)
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 0).astype(np.int64)


def length_buckets(steps: np.ndarray, max_padding: float | None,
                   chunk: int | None) -> list[np.ndarray]:
    """The cohort's rows grouped to run as one vmap each, every group up to its own longest client.

    `max_padding` None: consecutive rows in chunks of `chunk` (every chunk padded to its longest).
    Else rows sorted by steps, longest first, and a group closed before a client whose joining would
    make the group's computed steps exceed `max_padding` x its real steps: the whole round's padding
    factor is then <= max_padding too. Rows with the same steps keep their cohort order."""
    n = len(steps)
    chunk = chunk or max(n, 1)
    if max_padding is None:
        return [np.arange(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    buckets: list[np.ndarray] = []
    current: list[int] = []
    real = 0
    for row in np.argsort(-steps, kind="stable"):
        s = int(steps[row])
        if current and (len(current) == chunk
                        or (len(current) + 1) * int(steps[current[0]]) > max_padding * (real + s)):
            buckets.append(np.array(current))
            current, real = [], 0
        current.append(int(row))
        real += s
    if current:
        buckets.append(np.array(current))
    return buckets


def computed_steps(steps: np.ndarray, buckets: list[np.ndarray]) -> tuple[int, int]:
    """(client-steps computed: every group to its longest, client-steps with data)."""
    return sum(len(b) * int(steps[b].max()) for b in buckets if len(b)), int(steps.sum())


def padding_factor(computed: int, real: int) -> float:
    return computed / real if real else 1.0


class SequentialExecutor:
    name = "sequential"

    def __init__(self, compile: bool = False, memory_format: torch.memory_format | None = None,
                 compile_mode: str | None = None):
        self.steps = CompiledSteps(compile, compile_mode)
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
                           torch.stack(losses), samples, client_steps=int(host_mask.sum()))

    def client_steps(self, sched: BatchSchedule) -> tuple[int, int]:
        """(client-steps computed, client-steps with data): masked steps are skipped."""
        real = int(step_counts(sched).sum())
        return real, real


class BatchedExecutor:
    name = "batched"

    def __init__(self, chunk_size: int | None = None, compile: bool = False,
                 max_padding: float | None = 1.2, compile_mode: str | None = None):
        self.chunk_size = chunk_size
        self.max_padding = max_padding
        # groups of varying sizes: after the first size change torch.compile makes the client dim
        # dynamic (one more graph) instead of compiling a graph per size
        self.steps = CompiledSteps(compile, compile_mode, dynamic=None if max_padding is not None else False)

    def _step_fn(self, fns: ClientFns):
        return self.steps.get(fns.step, vmap(fns.step, in_dims=(0, None, 0)))

    def buckets(self, sched: BatchSchedule) -> tuple[list[np.ndarray], np.ndarray]:
        steps = step_counts(sched)
        return length_buckets(steps, self.max_padding, self.chunk_size), steps

    def client_steps(self, sched: BatchSchedule) -> tuple[int, int]:
        """(client-steps computed, client-steps with data) of this executor's grouping."""
        buckets, steps = self.buckets(sched)
        return computed_steps(steps, buckets)

    def run(self, fns: ClientFns, down: Tree, cstates: Tree, client_ids: torch.Tensor, view: ClientView,
            sched: BatchSchedule) -> RoundResult:
        init = vmap(fns.init, in_dims=(None, 0, 0))
        step = self._step_fn(fns)
        final = vmap(fns.final, in_dims=(0, None, 0))
        ups, news, losses = [], [], []
        progress = fns.needs_progress
        buckets, steps = self.buckets(sched)
        host_mask = sched.host_mask()
        for rows_np in buckets:
            # consecutive rows index as a slice (a view); a sorted bucket gathers its rows
            contiguous = bool(np.all(np.diff(rows_np) == 1))
            rows = (slice(int(rows_np[0]), int(rows_np[-1]) + 1) if contiguous
                    else torch.as_tensor(rows_np, device=client_ids.device))
            cs = tree_index(cstates, rows)
            local = init(down, cs, client_ids[rows])
            mask_rows = sched.step_mask[rows]
            host_rows = host_mask[rows_np]
            total = torch.zeros(mask_rows.shape[0], dtype=sched.weight.dtype, device=sched.weight.device)
            for s in range(int(steps[rows_np].max())):
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
        order = np.concatenate(buckets) if buckets else np.zeros(0, dtype=np.int64)
        if np.array_equal(order, np.arange(len(order))):
            unsort = None
        else:  # back to cohort order
            unsort = torch.as_tensor(np.argsort(order), device=client_ids.device)
        back = (lambda t: t) if unsort is None else (lambda t: tree_index(t, unsort))
        return RoundResult(back(tree_cat(ups)),
                           {} if not news or tree_is_empty(news[0]) else back(tree_cat(news)),
                           back(torch.cat(losses)), samples,
                           padding_factor=padding_factor(*computed_steps(steps, buckets)),
                           client_steps=int(steps.sum()))


Executor = SequentialExecutor | BatchedExecutor


@dataclass(frozen=True)
class ExecutorOptions:
    """How the executors run (hardware.*): chunking, bucketing, compilation, conv layout."""

    chunk_size: int | None = None       # batched: at most this many clients per vmap
    compile: bool = False               # torch.compile the client step
    compile_mode: str | None = None     # torch.compile mode (reduce-overhead: CUDA graphs)
    max_padding: float | None = 1.2     # batched: bucket clients by steps (None: cohort order)
    memory_format: torch.memory_format | None = None  # sequential: conv weights' layout

    def sequential(self) -> SequentialExecutor:
        return SequentialExecutor(self.compile, self.memory_format, self.compile_mode)

    def batched(self) -> BatchedExecutor:
        return BatchedExecutor(self.chunk_size, self.compile, self.max_padding, self.compile_mode)


def pick_executor(requested: str, method: Method, model: torch.nn.Module | None, device: torch.device,
                  options: ExecutorOptions = ExecutorOptions(), policy: str = "heuristic",
                  trial: Callable[[Executor], Any] | None = None) -> tuple[Executor, str]:
    """Return (executor, reason).

    `auto` with policy `heuristic` follows measurements on a 2-core CPU (README, Performance: vmap wins
    for small dense models and on GPUs; on a CPU conv nets are already compute-bound). Policy `timed`
    runs `trial(executor)` (one round whose result is thrown away) with each executor and keeps the faster.
    """
    if requested == "sequential" or not method.batchable:
        why = "requested" if requested == "sequential" else f"method {method.name} is sequential-only"
        return options.sequential(), why
    if requested == "batched":
        return options.batched(), "requested"
    if policy == "timed" and trial is not None:
        import time

        timings = {}
        candidates = [options.sequential(), options.batched()]
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
        return (options.sequential(),
                f"auto: method {method.name} (padding to the longest client would waste compute)")
    has_conv = model is not None and any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    if device.type == "cuda":
        return options.batched(), "auto: CUDA device"
    if has_conv:
        return options.sequential(), "auto: conv net on CPU (compute-bound, vmap measured slower)"
    return options.batched(), "auto: dense model on CPU (per-step overhead dominates)"
