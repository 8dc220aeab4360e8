"""Evaluation as a callback: the global model on the global splits, each client's own model on its own
splits (personal/*), sparsity of the final model (density, TDR where the true support is known), and
the two best trackers (rounds-to-best chosen on validation only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedbench.data.partitions import Partition
from fedbench.engine.functional import tree_index
from fedbench.metrics import names
from fedbench.metrics.evaluate import evaluate, evaluate_fn
from fedbench.metrics.sparsity import density, feature_support, support_scores
from fedbench.metrics.tracker import BestTracker
from fedbench.run.callbacks import Callback, callback

if TYPE_CHECKING:
    from fedbench.methods.base import Method
    from fedbench.run.build import Run
    from fedbench.run.state import RunState


def evaluate_global(method: Method, gstate: dict[str, Any], dataset: Any) -> tuple[dict, dict]:
    """(val, test) metrics of the global model, through the method's `predict`."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return method.predict(gstate, x)

    return tuple(evaluate_fn(forward, x, y, dataset.task)
                 for x, y in ((dataset.x_val, dataset.y_val), (dataset.x_test, dataset.y_test)))


def evaluate_personal(method: Method, gstate: dict[str, Any], cstates: dict[str, Any],
                      model: torch.nn.Module, dataset: Any, part: Partition) -> dict[str, float]:
    """Each client's own model on its own local validation / test split (personal/*).

    Methods without personal state (FedAvg ...) are scored with the global model on the same splits
    (`personal_params` defaults to the global model), so global and personalized methods compare on
    equal terms."""
    out: dict[str, float] = {}
    for split, index_sets in (("val", part.val), ("test", part.test)):
        accs, counts = [], []
        for k, idx in enumerate(index_sets):
            if len(idx) == 0:
                continue
            train = torch.as_tensor(part.train[k], device=dataset.x_train.device)
            params, buffers = method.personal_params(gstate, tree_index(cstates, k), dataset.x_train[train],
                                                     dataset.y_train[train])
            ix = torch.as_tensor(idx, device=dataset.x_train.device)
            scores = evaluate(model, params, buffers, dataset.x_train[ix], dataset.y_train[ix], "classification")
            accs.append(scores["acc"])
            counts.append(len(idx))
        if accs:
            a, n = np.array(accs), np.array(counts)
            out[names.personal(split)] = float((a * n).sum() / n.sum())  # weighted by client split size
            out[names.personal(split, "std")] = float(a.std())           # spread over clients
            out[names.personal(split, "min")] = float(a.min())
    return out


def sparsity_metrics(method: Method, gstate: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """density / expected_density / n_gated of methods that sparsify, and TDR, recall, F1 where the
    true support is known (never logged as 0 where it is not)."""
    gated = method.gated_final(gstate)
    if gated is None:
        return {}
    dens, n_gated = density(gated)
    out: dict[str, Any] = {names.DENSITY: dens, names.N_GATED: n_gated, names.NNZ: int(round(dens * n_gated))}
    expected = method.expected_density(gstate)
    if expected is not None:
        out[names.EXPECTED_DENSITY] = expected
    if dataset.true_support is not None:
        selected = feature_support(gated, int(dataset.x_train.shape[-1]))
        if selected is not None:
            out.update({f"sparsity/{k}": v for k, v in support_scores(selected, dataset.true_support).items()})
    return out


@callback("evaluation")
class EvaluationCallback(Callback):
    """On evaluated rounds (every `eval_every`, the last, or what the method says) adds global/*,
    sparsity/*, personal/* and best/* to the row. Owns the two best trackers (global validation, the
    clients' own validation splits): rounds-to-best and rounds-to-target are chosen on validation only."""

    stage = "evaluate"

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.loaded: dict[str, Any] = {}

    def on_start(self, run: Run, state: RunState) -> None:
        target = run.cfg.metrics.target
        self.best, self.best_personal = BestTracker(target=target), BestTracker(target=target)
        if self.loaded:
            self.best.load_state_dict(self.loaded.get("best", {}))
            self.best_personal.load_state_dict(self.loaded.get("best_personal", {}))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state  # applied in on_start, once the target is known

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.state_dict(), "best_personal": self.best_personal.state_dict()}

    def after_round(self, run: Run, state: RunState, row: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
        r, method = state.round, run.method
        due = r % int(run.cfg.eval_every) == 0 or r == run.rounds
        out: dict[str, Any] = {}
        if not method.should_evaluate(r, due):
            return False, out
        if method.has_global_model:
            out.update(self.global_metrics(run, state))
        if run.has_local_splits:
            personal = evaluate_personal(method, state.gstate, state.cstates, run.model, run.dataset, run.part)
            out.update(personal)
            if personal:
                select = personal.get(names.PERSONAL_VAL_ACC, personal.get(names.PERSONAL_TEST_ACC))
                self.best_personal.update(r, select, personal.get(names.PERSONAL_TEST_ACC))
                out.update({names.BEST_PERSONAL_VAL_ACC: self.best_personal.best_val,
                            names.BEST_PERSONAL_ROUND: self.best_personal.best_round})
        return False, out

    def global_metrics(self, run: Run, state: RunState) -> dict[str, Any]:
        val, test = evaluate_global(run.method, state.gstate, run.dataset)
        out = {names.global_metric(split, k): v for split, d in (("val", val), ("test", test)) for k, v in d.items()}
        out.update(sparsity_metrics(run.method, state.gstate, run.dataset))
        task = run.dataset.task
        self.best.update(state.round, val[names.score(task)], test.get(names.score(task)))
        out.update({names.best_val(task): self.best.best_val, names.BEST_ROUND: self.best.best_round})
        return out

    def summary(self, run: Run, state: RunState) -> dict[str, Any]:
        task, best = run.dataset.task, self.best
        out = {names.best_val(task): best.best_val, names.BEST_ROUND: best.best_round,
               names.best_test(task): best.test_at_best, names.ROUNDS_TO_TARGET: best.rounds_to_target,
               names.TARGET: best.target}
        if self.best_personal.best_round is not None:
            out.update({names.BEST_PERSONAL_VAL_ACC: self.best_personal.best_val,
                        names.BEST_PERSONAL_ROUND: self.best_personal.best_round,
                        names.BEST_PERSONAL_TEST_ACC: self.best_personal.test_at_best})
        return out
