"""Executors run the clients of one round with the SAME method code.

`sequential` loops over clients and steps (the test oracle); `batched` maps the method's per-client
functions over the cohort with torch.func.vmap, in chunks of `chunk_size` clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import vmap

from fedbench.data.clients import BatchSchedule, ClientView
from fedbench.engine.functional import Tree, tree_cat, tree_index, tree_stack, tree_where


@dataclass
class RoundResult:
    uplink: Tree            # stacked [K, ...]
    client_states: Tree     # new persistent client state of the cohort, stacked [K, ...]
    loss: torch.Tensor      # [K] mean local training loss
    samples: int            # training samples processed (for throughput)


def _gather(view: ClientView, sched: BatchSchedule, rows: Any, s: int):
    idx = sched.idx[rows, s]
    return view.x[idx], view.y[idx], sched.weight[rows, s]


class SequentialExecutor:
    name = "sequential"

    def run(self, method: Any, down: Tree, cstates: Tree, client_ids: torch.Tensor, view: ClientView,
            sched: BatchSchedule) -> RoundResult:
        ups, news, losses = [], [], []
        for k in range(len(client_ids)):
            cs = tree_index(cstates, k)
            local = method.client_init(down, cs, client_ids[k])
            total = torch.zeros((), dtype=sched.weight.dtype, device=sched.weight.device)
            n_steps = 0
            for s in range(sched.steps):
                if not bool(sched.step_mask[k, s]):
                    continue
                x, y, w = _gather(view, sched, k, s)
                local, loss = method.client_step(local, down, x, y, w)
                total = total + loss
                n_steps += 1
            up, new_cs = method.client_final(local, down, cs)
            ups.append(up)
            news.append(new_cs)
            losses.append(total / max(n_steps, 1))
        samples = int(sched.weight.sum().item())
        return RoundResult(tree_stack(ups), tree_stack(news) if news and news[0] else {},
                           torch.stack(losses), samples)


class BatchedExecutor:
    name = "batched"

    def __init__(self, chunk_size: int | None = None):
        self.chunk_size = chunk_size

    def run(self, method: Any, down: Tree, cstates: Tree, client_ids: torch.Tensor, view: ClientView,
            sched: BatchSchedule) -> RoundResult:
        k_total = len(client_ids)
        chunk = self.chunk_size or k_total
        init = vmap(method.client_init, in_dims=(None, 0, 0))
        step = vmap(method.client_step, in_dims=(0, None, 0, 0, 0))
        final = vmap(method.client_final, in_dims=(0, None, 0))
        ups, news, losses = [], [], []
        for start in range(0, k_total, chunk):
            rows = slice(start, min(start + chunk, k_total))
            cs = {k: v[rows] for k, v in cstates.items()} if cstates else {}
            local = init(down, cs, client_ids[rows])
            mask_rows = sched.step_mask[rows]
            total = torch.zeros(mask_rows.shape[0], dtype=sched.weight.dtype, device=sched.weight.device)
            for s in range(sched.steps):
                x, y, w = _gather(view, sched, rows, s)
                new_local, loss = step(local, down, x, y, w)
                m = mask_rows[:, s]
                local = tree_where(m, new_local, local)
                total = total + torch.where(m, loss, torch.zeros_like(loss))
            up, new_cs = final(local, down, cs)
            ups.append(up)
            news.append(new_cs)
            losses.append(total / mask_rows.sum(1).clamp_min(1).to(total.dtype))
        samples = int(sched.weight.sum().item())
        return RoundResult(tree_cat(ups), tree_cat(news) if news and news[0] else {}, torch.cat(losses), samples)


def pick_executor(requested: str, method: Any, model: torch.nn.Module, device: torch.device,
                  chunk_size: int | None) -> tuple[Any, str]:
    """Return (executor, reason). `auto` follows the measured facts in specs/performance.md:
    vmap wins for small dense models and on GPUs; on a CPU, conv nets are already compute-bound."""
    if requested == "sequential" or not getattr(method, "batchable", True):
        why = "requested" if requested == "sequential" else f"method {method.name} is sequential-only"
        return SequentialExecutor(), why
    if requested == "batched":
        return BatchedExecutor(chunk_size), "requested"
    has_conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    if device.type == "cuda":
        return BatchedExecutor(chunk_size), "auto: CUDA device"
    if has_conv:
        return SequentialExecutor(), "auto: conv net on CPU (compute-bound, vmap measured slower)"
    return BatchedExecutor(chunk_size), "auto: dense model on CPU (per-step overhead dominates)"
