"""Evaluation as a callback: the global model on the global splits, each client's own model on its own
splits (personal/*), sparsity of the final model (density, TDR where the true support is known), and
the two best trackers (rounds-to-best chosen on validation only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedbench.data.partitions import Partition
from fedbench.engine.functional import tree_index
from fedbench.metrics.evaluate import evaluate, evaluate_fn
from fedbench.metrics.sparsity import density, feature_support, support_scores
from fedbench.run.callbacks import Callback

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
            out[f"personal/{split}_acc"] = float((a * n).sum() / n.sum())  # weighted by client split size
            out[f"personal/{split}_acc_std"] = float(a.std())                # spread over clients
            out[f"personal/{split}_acc_min"] = float(a.min())
    return out


def sparsity_metrics(method: Method, gstate: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """density / expected_density / n_gated of methods that sparsify, and TDR, recall, F1 where the
    true support is known (never logged as 0 where it is not)."""
    gated = method.gated_final(gstate)
    if gated is None:
        return {}
    dens, n_gated = density(gated)
    out: dict[str, Any] = {"sparsity/density": dens, "sparsity/n_gated": n_gated,
                           "sparsity/nnz": int(round(dens * n_gated))}
    expected = method.expected_density(gstate)
    if expected is not None:
        out["sparsity/expected_density"] = expected
    if dataset.true_support is not None:
        selected = feature_support(gated, int(dataset.x_train.shape[-1]))
        if selected is not None:
            out.update({f"sparsity/{k}": v for k, v in support_scores(selected, dataset.true_support).items()})
    return out


class EvaluationCallback(Callback):
    """On evaluated rounds (every `eval_every`, the last, or what the method says) adds global/*,
    sparsity/*, personal/* and best/* to the row and updates the trackers."""

    def after_round(self, run: Run, state: RunState, row: dict[str, Any]) -> bool:
        r, method = state.round, run.method
        due = r % int(run.cfg.eval_every) == 0 or r == run.rounds
        if not method.should_evaluate(r, due):
            return False
        if method.has_global_model:
            row.update(self.global_metrics(run, state))
        if run.has_local_splits:
            personal = evaluate_personal(method, state.gstate, state.cstates, run.model, run.dataset, run.part)
            row.update(personal)
            if personal:
                select = personal.get("personal/val_acc", personal.get("personal/test_acc"))
                state.best_personal.update(r, select, personal.get("personal/test_acc"))
                row.update({"best/personal_val_acc": state.best_personal.best_val,
                            "best/personal_round": state.best_personal.best_round})
        state.last_eval = dict(row)
        return False

    @staticmethod
    def global_metrics(run: Run, state: RunState) -> dict[str, Any]:
        val, test = evaluate_global(run.method, state.gstate, run.dataset)
        out = {f"global/{name}_{k}": v for name, d in (("val", val), ("test", test)) for k, v in d.items()}
        out.update(sparsity_metrics(run.method, state.gstate, run.dataset))
        key = "acc" if run.dataset.task == "classification" else "r2"
        state.best.update(state.round, val[key], test.get(key))
        out.update({"best/val_acc": state.best.best_val, "best/round": state.best.best_round})
        return out
