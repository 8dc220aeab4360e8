"""What the run hands a method: the run context (once per run) and the round context (every round).

Methods are written for ONE client as pure tensor functions (`ClientFns`); an executor maps them over
the round's cohort. See `fedbench.methods.base.Method` for the method protocol itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedbench.engine.functional import LossFn

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RunContext:
    """Everything a method may know about the run; passed to `Method.setup` (fresh run or resume)."""

    device: torch.device
    task: str                                  # classification | regression
    num_classes: int
    in_features: int                           # number of input values per sample (prod of the input shape)
    total_rounds: int
    lr: float                                  # the client learning rate
    seed: int = 0
    model: nn.Module | None = None             # the backbone module (None: the method brings its own model)
    loss_fn: LossFn | None = None              # loss(params, buffers, x, y, w) of the backbone
    params: Tensors = field(default_factory=dict)   # the run's starting parameters / buffers
    buffers: Tensors = field(default_factory=dict)
    label_counts: torch.Tensor | None = None   # [N, C] training label counts per client (classification)
    # the pooled training data of all clients, gathered on demand: a server-held sample comes from it
    pooled_train: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    # metrics.extractors: method (each method's own evaluation convention) | both (personal models
    # with a personal head on a shared extractor are also scored with the global and their own one)
    extractors: str = "method"


@dataclass(frozen=True)
class RoundContext:
    """The static facts of one round, the same for every client of its cohort."""

    round: int                 # r = 1..R
    cohort: torch.Tensor       # [K] client ids, on the run's device
    sizes: torch.Tensor        # [K] training-set sizes of the cohort (FedAvg's weights)
    n_clients: int             # N: the clients that may train (held-out clients never do)
    total_rounds: int          # R
    steps: torch.Tensor | None = None  # [K] local steps each client completes (stragglers: fewer)
    dropped: int = 0           # sampled clients whose update never arrives (they got the broadcast)


@dataclass(frozen=True)
class ClientFns:
    """One client's code for a round:

        init(down, client_state, client_id) -> local state
        step(local, down, batch) -> (local state, loss)     batch = {x, y, w, noise?, progress?}
        final(local, down, client_state) -> (uplink tensors, new client state)
    """

    init: Callable[..., Any]
    step: Callable[..., Any]
    final: Callable[..., Any]
    needs_progress: bool = False   # batches carry `progress` = step / the client's number of steps
