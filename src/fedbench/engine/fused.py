"""The clients of several runs as ONE computation (fused sweeps, hydra/launcher=fused).

Every run of a fused group has the same method, model shapes, cohort size and schedule shape; it differs
in its seed (model init, cohorts, batches), its partition, its lr and the method's `run_keys`. The
client functions of one method object (the group's first run) are mapped over (run, client) with two
nested torch.func.vmap: the outer over runs (its broadcast, client states, batches and per-run values:
the round's lr and the method's `client_run_keys`, bound by `Method.run_values`), the inner over the
run's cohort, as the batched executor does. Runs may have different numbers of local steps (their
clients' data sizes differ): every (run, client) row runs to the group's longest and the extra steps
are masked, as in the batched executor. The server side stays per run (fedbench.run.fused).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import vmap

from fedbench.data.clients import BatchSchedule, ClientView
from fedbench.engine.executors import RoundResult, _gather, padding_factor, step_counts
from fedbench.engine.functional import Tree, tree_index, tree_is_empty, tree_stack, tree_where
from fedbench.engine.protocol import ClientFns

if TYPE_CHECKING:
    from fedbench.methods.base import Method


@dataclass
class RunRound:
    """One run's part of a fused round: what its server broadcast, its cohort's client states, its
    data and batch schedule, and its per-run values (the round's lr, the method's client_run_keys)."""

    down: Tree
    cstates: Tree                # the cohort's client states, stacked [K, ...]
    client_ids: torch.Tensor     # [K]
    view: ClientView
    sched: BatchSchedule
    values: dict[str, torch.Tensor]


def reuse_large_allocations() -> bool:
    """glibc serves every allocation above its mmap threshold (32 MiB at most) with fresh pages and
    unmaps them on free, so a fused group's large per-step tensors ([runs, clients, batch, ...]) page
    fault on every step: a 41 MB gather measured 3x slower than into reused memory. Serve them from the
    heap and keep freed memory for reuse (returned to the system above 1 GiB free). Linux/glibc only;
    elsewhere nothing changes. Returns whether it applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def run_values(method: Method, lr: float, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The per-run values the fused client functions read: the round's lr and the client_run_keys."""
    values = {"lr": lr, **method.client_run_values()}
    return {key: torch.tensor(v, dtype=dtype, device=device) for key, v in values.items()}


def _batch(part: RunRound, s: int, progress: bool) -> dict[str, torch.Tensor]:
    """Step s of one run's cohort; past the run's last step, its last batch again (masked out)."""
    last = part.sched.steps - 1
    rows = slice(0, len(part.client_ids))
    return _gather(part.view, part.sched, rows, min(s, last), progress)


def _batches(parts: list[RunRound], s: int, progress: bool) -> dict[str, torch.Tensor]:
    """Step s of every run, stacked [R, K, B, ...]. Runs of one dataset share its tensors: their
    samples come in one gather (no per-run copy to stack)."""
    x, y = parts[0].view.x, parts[0].view.y
    if not all(p.view.x is x and p.view.y is y for p in parts):
        return tree_stack([_batch(p, s, progress) for p in parts])
    steps = [min(s, p.sched.steps - 1) for p in parts]
    idx = torch.stack([p.sched.idx[:, t] for p, t in zip(parts, steps, strict=True)])  # [R, K, B]
    flat = idx.reshape(-1)
    batch = {"x": torch.index_select(x, 0, flat).view(*idx.shape, *x.shape[1:]),
             "y": torch.index_select(y, 0, flat).view(*idx.shape, *y.shape[1:]),
             "w": torch.stack([p.sched.weight[:, t] for p, t in zip(parts, steps, strict=True)])}
    if parts[0].sched.noise is not None:
        batch["noise"] = torch.stack([p.sched.noise[:, t] for p, t in zip(parts, steps, strict=True)])
    if progress:  # as the batched executor: step / the client's number of steps
        batch["progress"] = torch.stack([
            t / p.sched.step_mask.sum(-1).clamp_min(1).to(p.sched.weight.dtype)
            for p, t in zip(parts, steps, strict=True)])
    return batch


def run_fused_clients(method: Method, fns: ClientFns, parts: list[RunRound]) -> list[RoundResult]:
    """The round's clients of every run in `parts` as one computation; one RoundResult per run, equal
    (up to the order of floating-point sums) to what each run's batched executor returns."""
    if any(p.sched.steps == 0 for p in parts):
        raise ValueError("a run of the fused group has a round without local steps")

    def bound(fn: Any) -> Any:
        def call(values: dict[str, torch.Tensor], *args: Any) -> Any:
            with method.run_values(values):
                return fn(*args)
        return call

    # inner vmap: the run's cohort (values and broadcast shared); outer: the runs
    init = vmap(vmap(bound(fns.init), in_dims=(None, None, 0, 0)), in_dims=0)
    step = vmap(vmap(bound(fns.step), in_dims=(None, 0, None, 0)), in_dims=0)
    final = vmap(vmap(bound(fns.final), in_dims=(None, 0, None, 0)), in_dims=0)

    values = tree_stack([p.values for p in parts])
    down = tree_stack([p.down for p in parts])
    cstates = {} if tree_is_empty(parts[0].cstates) else tree_stack([p.cstates for p in parts])
    ids = torch.stack([p.client_ids for p in parts])
    counts = [step_counts(p.sched) for p in parts]           # [K] real steps of each run's clients
    n_steps = int(max(c.max() for c in counts))
    host = np.stack([np.arange(n_steps)[None, :] < c[:, None] for c in counts])  # [R, K, S]
    mask = torch.as_tensor(host, device=ids.device)
    local = init(values, down, cstates, ids)
    dtype = parts[0].sched.weight.dtype
    total = torch.zeros(ids.shape, dtype=dtype, device=ids.device)
    for s in range(n_steps):
        batch = _batches(parts, s, fns.needs_progress)
        new_local, loss = step(values, local, down, batch)
        if host[:, :, s].all():
            local, total = new_local, total + loss
        else:
            m = mask[:, :, s]
            local = tree_where(m, new_local, local)
            total = total + torch.where(m, loss, torch.zeros_like(loss))
    up, new_cs = final(values, local, down, cstates)
    loss = total / mask.sum(-1).clamp_min(1).to(dtype)
    real = [int(c.sum()) for c in counts]
    computed = n_steps * len(parts[0].client_ids)
    return [RoundResult(tree_index(up, i), {} if tree_is_empty(new_cs) else tree_index(new_cs, i), loss[i],
                        int(p.sched.weight.sum().item()), padding_factor=padding_factor(computed, real[i]),
                        client_steps=real[i])
            for i, p in enumerate(parts)]
