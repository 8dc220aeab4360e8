"""The method protocol, in one place. Client code is written for ONE client as pure tensor functions;
the executor adds the client dimension (a loop, or torch.func.vmap). See docs/architecture.md.

Required (server side):
    init_global(params, buffers)                 -> global state (a tree of tensors)
    broadcast(global_state, round_ctx)           -> downlink Payload
    aggregate(global_state, stacked_up, round_ctx) -> (global state, {metric: value})
Required (one client; batchable: no Python branches on tensor values, no .item(), no torch.optim):
    client_init(down, client_state, client_id)   -> local state
    client_step(local, down, batch)              -> (local state, loss)   batch = {x, y, w, noise?, progress?}
    client_final(local, down, client_state)      -> (uplink tensors, new client state)

Optional, with the defaults below (override what the method needs; nothing is probed with hasattr):
    Config                      the hyperparameters, a frozen dataclass (defaults written once)
    setup(run_ctx)              once per run (fresh or resumed): what the method needs from the run
    prepare_model(model, ctx)   change the backbone before the starting parameters are taken (FedSQ's
                                central calibration); returns provenance for the summary
    init_client_states(gstate, n_clients) -> persistent per-client state, a tree stacked [N, ...]
    client_fns(round_ctx)       the three client functions of a round (bind static round facts here)
    uplink(stacked_up)          -> uplink Payload (encodings for byte counting)
    personalize(gstate, cohort_states, up, ctx) -> (cohort_states, Payload | None): the server's change to
                                the cohort's client states after aggregation (FedPAC's classifier
                                combination); the payload is what that sends each client (downlink bytes)
    uplink_share(up, ctx, rows) -> the additive share of clients `rows` in what aggregate reduces the
                                uplink to (weighted means); with `aggregate_shares(gstate, reduced, ctx)`
                                it lets a sharded round all-reduce one model-sized message per rank
                                instead of gathering every client's uplink. The FedAvg family
                                (methods/local_sgd.py) always aggregates this way; its methods change the
                                result in `post_aggregate`, never by overriding `aggregate`
    check_run(run)              run-level requirements (rounds, participation, ...), ConfigError if unmet
    local_epochs(configured)    local epochs per round (default: the run's `local_epochs`; FedRep's own
                                head + body epochs)
    should_evaluate(round, due) evaluate on this round? (default: `due`, from eval_every)
    predict(gstate, x)          the global model's outputs (default: the backbone with eval_state)
    personal_params(gstate, client_state, x_train, y_train) -> the (params, buffers) a client predicts
                                with (default: the global model, so every method is scored per client)
    new_client_params(gstate, client_state, x_train, y_train) -> the same for a client that never
                                trained (held-out clients, unseen/*): the method's rule for a new client
    extractor_conventions()     the extractors its personal models can also be scored with
                                (metrics.extractors=both: ("global", "own") where a client trains the
                                shared extractor and predicts with a personal head; default: none)
    personal_params_with(gstate, client_state, x_train, y_train, extractor) -> personal_params with
                                the global extractor or with the client's own (personal_global/*,
                                personal_own/*)
    gated_final(gstate)         the sparsified tensors (density, TDR); None: the method does not sparsify
    expected_density(gstate)    mean P(gate open); None where it does not apply
Declared flags: batchable, prefers_sequential, uses_backbone, has_global_model, reports_train_loss,
aggregates_by_shares (derived, not set by hand: True for the FedAvg family unless a subclass replaces
`aggregate`), noise_dim (> 0: batch["noise"] holds uniform numbers of that size per step from the client's seeded
generator, so executors agree and a resumed run redraws them), step_size_keys (the config keys that are
step sizes besides the run's lr: a diverged run names them).

Fused sweeps (hydra/launcher=fused) run the clients of several runs as ONE computation, with each run's
own server-side method object. `fusable` says a method may be fused; `run_keys` are the config keys that
may differ between the runs of one fused group (server-side keys need nothing more: each run aggregates
with its own object); `client_run_keys` (a subset) are keys the client functions read: inside the fused
client functions they are per-run tensors, like `self.lr`, so they may enter arithmetic only, never a
Python branch. Every other config key must be equal across a group.

Anything a method carries across rounds lives in the global or client state (checkpointed), never on
the method object: resume is exact. The round's client learning rate (the run's `lr` on its
`lr_schedule`) is `self.lr`, set before each round.

The FedAvg family (local SGD from the broadcast model, then a server optimizer step) is in
methods/local_sgd.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch.func import functional_call

from fedbench.config import MethodConfig
from fedbench.engine.protocol import ClientFns, RoundContext, RunContext, Tensors
from fedbench.metrics.comm import Payload


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Run-level settings a method may require (`check_run`)."""

    rounds: int
    participation: float
    local_epochs: int
    local_steps: int | None
    federation: str | None = None  # what departs from everyone-every-round (data/federation.departure)


class Method:
    name = "base"
    Config: type[MethodConfig] = MethodConfig
    batchable = True           # False: sequential executor only
    prefers_sequential = False  # auto executor: sequential even where vmap would be picked
    uses_backbone = True       # False: the method has its own model (predict) and no backbone is built
    has_global_model = True    # False: accuracy is only meaningful per client (personal/*)
    has_personal_models = False  # True: clients predict with their own models (personal_params)
    reports_train_loss = True
    noise_dim = 0              # > 0: uniform noise of this size per local step in batch["noise"]
    aggregates_by_shares = False  # aggregate == aggregate_shares(uplink_share(whole cohort)); see local_sgd
    step_size_keys: tuple[str, ...] = ()  # config keys that are step sizes (named when a run diverges)
    fusable = False            # the clients of several runs may run as one computation (fused sweeps)
    predicts_with_backbone = True  # predict(gstate, x) is the backbone on eval_state(gstate) (fused
    #                                sweeps evaluate such runs' models in one batched pass)
    run_keys: tuple[str, ...] = ()         # config keys that may differ inside a fused group
    client_run_keys: tuple[str, ...] = ()  # those of them the client functions read (per-run tensors)

    def __init__(self, config: MethodConfig | None = None):
        self.cfg = config if config is not None else self.Config(name=self.name)

    def client_run_values(self) -> dict[str, float]:
        """This run's values of the `client_run_keys` (fused sweeps make them per-run tensors)."""
        values = dataclasses.asdict(self.cfg)
        return {key: float(values[key]) for key in self.client_run_keys}

    @contextlib.contextmanager
    def run_values(self, values: dict[str, Any]) -> Iterator[None]:
        """Inside fused client functions: the round's lr (`values["lr"]`) and the `client_run_keys` are
        one run's values (tensors batched over the runs of the group) while the functions run."""
        saved_lr, saved_cfg = self.lr, self.cfg
        cfg = copy.copy(self.cfg)
        for key in self.client_run_keys:
            object.__setattr__(cfg, key, values[key])  # a frozen dataclass: a copy, then its fields
        self.lr, self.cfg = values["lr"], cfg
        try:
            yield
        finally:
            self.lr, self.cfg = saved_lr, saved_cfg

    # ---- run set-up -------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module, ctx: RunContext) -> dict[str, Any]:
        return {}

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.device, self.model, self.task = ctx.device, ctx.model, ctx.task
        self.loss_fn, self.lr = ctx.loss_fn, float(ctx.lr)
        self.num_classes, self.in_features = ctx.num_classes, ctx.in_features
        self.total_rounds = ctx.total_rounds

    def check_run(self, run: RunSpec) -> None:
        return None

    def local_epochs(self, configured: int) -> int:
        return configured

    # ---- server side ------------------------------------------------------------------------
    def init_global(self, params: Tensors, buffers: Tensors) -> dict[str, Any]:
        return {"params": params, "buffers": buffers}

    def init_client_states(self, gstate: dict[str, Any], n_clients: int) -> dict[str, Any]:
        return {}

    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        raise NotImplementedError

    def uplink(self, stacked_up: dict[str, Any]) -> Payload:
        return Payload(stacked_up, stacked=True)

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        raise NotImplementedError

    def personalize(self, gstate: dict[str, Any], cohort_states: Any, up: dict[str, Any],
                    ctx: RoundContext) -> tuple[Any, Payload | None]:
        return cohort_states, None

    def uplink_share(self, up: dict[str, Any], ctx: RoundContext, rows: slice) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name} aggregates every client's uplink")

    def aggregate_shares(self, gstate: dict[str, Any], reduced: dict[str, Any],
                         ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        raise NotImplementedError(f"{self.name} aggregates every client's uplink")

    # ---- client side (one client; batchable) -------------------------------------------------
    def client_fns(self, ctx: RoundContext) -> ClientFns:
        return ClientFns(self.client_init, self.client_step, self.client_final)

    def client_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def client_step(self, local: dict[str, Any], down: dict[str, Any],
                    batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        raise NotImplementedError

    def client_final(self, local: dict[str, Any], down: dict[str, Any], cstate: Any) -> tuple[dict[str, Any], Any]:
        raise NotImplementedError

    # ---- evaluation and reporting -------------------------------------------------------------
    def should_evaluate(self, round_: int, due: bool) -> bool:
        return due

    def eval_state(self, gstate: dict[str, Any]) -> tuple[Tensors, Tensors]:
        return gstate["params"], gstate["buffers"]

    def predict(self, gstate: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            return functional_call(self.model, self.eval_state(gstate), (x,))
        finally:
            self.model.train(was)

    def personal_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                        y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        return self.eval_state(gstate)

    def extractor_conventions(self) -> tuple[str, ...]:
        return ()

    def personal_params_with(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                             y_train: torch.Tensor, extractor: str) -> tuple[Tensors, Tensors]:
        raise NotImplementedError(f"{self.name} has one evaluation convention (extractor_conventions)")

    def new_client_params(self, gstate: dict[str, Any], cstate: Any, x_train: torch.Tensor,
                          y_train: torch.Tensor) -> tuple[Tensors, Tensors]:
        """What a client that never trained (`cstate`: its starting client state) predicts with, given its
        own training samples (unseen/* metrics). Default: `personal_params` (the global model for methods
        without personal models); personalized methods fit their personal part first."""
        return self.personal_params(gstate, cstate, x_train, y_train)

    def model_tensors(self, gstate: dict[str, Any]) -> Tensors:
        return gstate["params"]

    def gated_final(self, gstate: dict[str, Any]) -> Tensors | None:
        return None

    def expected_density(self, gstate: dict[str, Any]) -> float | None:
        return None
