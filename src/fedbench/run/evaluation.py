"""Evaluation as a callback: the global model on the global splits, each client's own model on its own
splits (personal/*), sparsity of the final model (density, TDR where the true support is known), and
the two best trackers (rounds-to-best chosen on validation only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import functional_call, vmap

from fedbench.data.partitions import Partition
from fedbench.engine.functional import per_sample_loss, tree_index, tree_stack
from fedbench.metrics import names
from fedbench.metrics.evaluate import evaluate_fn, multilabel_counts, multilabel_scores
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


def evaluate_global_runs(methods: list[Method], gstates: list[dict[str, Any]], dataset: Any,
                         batch: int = 2048) -> list[tuple[dict, dict]]:
    """`evaluate_global` of several runs of one backbone on one dataset in one pass over the data: their
    models (each method's `eval_state`) stacked and the backbone mapped over them with vmap. For
    methods that `predicts_with_backbone`; the same figures as one run at a time (fused sweeps)."""
    states = [m.eval_state(g) for m, g in zip(methods, gstates, strict=True)]
    params, buffers = tree_stack([s[0] for s in states]), tree_stack([s[1] for s in states])
    model, task, n_runs = methods[0].model, dataset.task, len(methods)
    was_training = model.training
    model.eval()
    try:
        per_split = []
        for x, y in ((dataset.x_val, dataset.y_val), (dataset.x_test, dataset.y_test)):
            per_split.append(_evaluate_runs(model, params, buffers, x, y, task, n_runs, batch))
    finally:
        model.train(was_training)
    return list(zip(*per_split, strict=True))


@torch.no_grad()
def _evaluate_runs(model: torch.nn.Module, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor,
                   task: str, n_runs: int, batch: int) -> list[dict[str, float]]:
    """metrics.evaluate.evaluate_fn for n_runs stacked models: the same chunks, sums and formulas."""
    n = len(y)
    if n == 0:
        return [{} for _ in range(n_runs)]
    losses, correct = [0.0] * n_runs, [0] * n_runs
    counts = torch.zeros(n_runs, 3, dtype=torch.long)
    forward = vmap(lambda p, b, xb: functional_call(model, (p, b), (xb,)), in_dims=(0, 0, None))
    for i in range(0, n, batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        out = forward(params, buffers, xb).float()           # [R, b, ...]
        flat = out.reshape(n_runs * len(yb), *out.shape[2:])
        targets = yb.repeat(n_runs, *[1] * (yb.dim() - 1))
        loss = per_sample_loss(flat, targets, task).view(n_runs, -1).sum(-1).tolist()
        losses = [a + b for a, b in zip(losses, loss, strict=True)]
        if task == "classification":
            hits = (out.argmax(-1) == yb).sum(-1).tolist()
            correct = [a + b for a, b in zip(correct, hits, strict=True)]
        if task == "multilabel":
            counts += multilabel_counts(out, yb).cpu()
    if task == "multilabel":
        return [multilabel_scores(c, s, n, int(y.shape[-1])) for c, s in zip(counts.tolist(), losses, strict=True)]
    if task == "regression":
        var = float(((y - y.mean()) ** 2).mean())
        return [{"mse": s / n, "r2": 1.0 - (s / n) / var if var > 0 else float("nan"), "loss": s / n}
                for s in losses]
    return [{"acc": c / n, "loss": s / n} for c, s in zip(correct, losses, strict=True)]


def global_eval_due(run: Run, round_: int) -> bool:
    """Is the global model evaluated after this round (eval_every, the last round, the method's say)?"""
    due = round_ % int(run.cfg.eval_every) == 0 or round_ == run.rounds
    return run.method.has_global_model and run.method.should_evaluate(round_, due)


def evaluate_personal(method: Method, gstate: dict[str, Any], cstates: dict[str, Any],
                      model: torch.nn.Module, dataset: Any, part: Partition,
                      chunk: int = 64, extractor: str | None = None) -> dict[str, float]:
    """Each client's own model on its own local validation / test split (personal/*).

    Methods without personal state (FedAvg ...) are scored with the global model on the same splits
    (`personal_params` defaults to the global model), so global and personalized methods compare on
    equal terms. Batched over clients: clients whose models are the same tensors (a global model) share
    one forward pass over all their samples; the others are mapped with vmap, `chunk` clients at a time
    (each client's samples padded to the chunk's largest split). `extractor` ("global" | "own", one of
    the method's `extractor_conventions`): personal_global/* or personal_own/* instead."""
    device = dataset.x_train.device
    models: dict[int, tuple[dict, dict]] = {}
    for k in _scored_clients(part):
        train = torch.as_tensor(part.train[k], device=device)
        x, y, cstate = dataset.x_train[train], dataset.y_train[train], tree_index(cstates, k)
        models[k] = (method.personal_params(gstate, cstate, x, y) if extractor is None
                     else method.personal_params_with(gstate, cstate, x, y, extractor))
    name = names.personal if extractor is None else names.personal_with(extractor)
    return _client_accuracy(models, model, dataset, part, chunk, name)


def evaluate_global_on_clients(method: Method, gstate: dict[str, Any], model: torch.nn.Module,
                               dataset: Any, part: Partition) -> dict[str, float]:
    """The global model on each client's own validation / test split (clients/global_*): next to
    personal/* it shows what a method's personal models add over its global one (one forward pass)."""
    shared = method.eval_state(gstate)
    models = {k: shared for k in _scored_clients(part)}
    return _client_accuracy(models, model, dataset, part, 64, names.global_on_clients)


def _scored_clients(part: Partition) -> list[int]:
    """Clients that trained (not held out) and hold a local split."""
    held = set(part.holdout.tolist())
    return [k for k in range(part.num_clients) if k not in held and (len(part.val[k]) or len(part.test[k]))]


def evaluate_unseen(method: Method, gstate: dict[str, Any], cstates: dict[str, Any],
                    model: torch.nn.Module | None, dataset: Any, part: Partition) -> dict[str, float]:
    """Clients that never trained (partition.holdout_clients), scored on their test splits (all their
    samples where clients have no test split: none was ever trained on): the global model
    (unseen/global_*, pooled over their samples, with the spread over clients for backbone classifiers)
    and, for methods with personal models, the method's rule for a new client fitted on the client's
    training samples (unseen/personal_acc*)."""
    held = part.holdout.tolist()
    scored = part.test if any(len(part.test[k]) for k in held) else part.train
    clients = [k for k in held if len(scored[k])]
    if not clients:
        return {}
    empty = [np.zeros(0, dtype=np.int64)] * part.num_clients
    view = Partition(train=part.train, val=empty, test=[scored[k] if k in clients else empty[0]
                                                        for k in range(part.num_clients)])
    out: dict[str, float] = {}
    classifier = dataset.task == "classification" and model is not None and method.predicts_with_backbone
    if method.has_global_model:
        idx = torch.as_tensor(np.concatenate([scored[k] for k in clients]), device=dataset.x_train.device)
        pooled = evaluate_fn(lambda x: method.predict(gstate, x), dataset.x_train[idx], dataset.y_train[idx],
                             dataset.task)
        out.update({names.unseen(f"global_{k}"): v for k, v in pooled.items()})
        if classifier:
            shared = method.eval_state(gstate)
            # the mean is the pooled accuracy above; this adds the spread over clients and the worst one
            out.update(_client_accuracy({k: shared for k in clients}, model, dataset, view, 64,
                                        _unseen_name("global_acc")))
    if method.has_personal_models and classifier:
        models = {}
        for k in clients:
            train = torch.as_tensor(part.train[k], device=dataset.x_train.device)
            models[k] = method.new_client_params(gstate, tree_index(cstates, k), dataset.x_train[train],
                                                 dataset.y_train[train])
        out.update(_client_accuracy(models, model, dataset, view, 64, _unseen_name("personal_acc")))
    return out


def _unseen_name(metric: str) -> Any:
    """name(split, stat) for `_client_accuracy`: unseen/METRIC, unseen/METRIC_std ... (one split)."""
    return lambda split, stat="": names.unseen(metric + (f"_{stat}" if stat else ""))


def _client_accuracy(models: dict[int, tuple[dict, dict]], model: torch.nn.Module, dataset: Any,
                     part: Partition, chunk: int, name: Any) -> dict[str, float]:
    """Accuracy of each client's model in `models` on its own splits: the mean weighted by split size,
    the spread and the worst client, named `name(split, stat)`."""
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for split, index_sets in (("val", part.val), ("test", part.test)):
            clients = [k for k in models if len(index_sets[k])]
            if not clients:
                continue
            correct = _correct_per_client(model, models, clients, index_sets, dataset, chunk)
            n = np.array([len(index_sets[k]) for k in clients])
            a = np.array([correct[k] for k in clients]) / n
            out[name(split)] = float((a * n).sum() / n.sum())  # weighted by client split size
            out[name(split, "std")] = float(a.std())           # spread over clients
            out[name(split, "min")] = float(a.min())
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _correct_per_client(model: torch.nn.Module, models: dict[int, tuple[dict, dict]], clients: list[int],
                        index_sets: list[Any], dataset: Any, chunk: int) -> dict[int, int]:
    """Correct predictions of each client's model on its own samples of one split."""
    device = dataset.x_train.device
    correct: dict[int, int] = {}
    shared: dict[tuple[int, ...], list[int]] = {}  # clients holding the very same tensors
    for k in clients:
        params, buffers = models[k]
        shared.setdefault(tuple(id(t) for t in (*params.values(), *buffers.values())), []).append(k)
    singles = []
    for group in shared.values():
        if len(group) == 1:
            singles.append(group[0])
            continue
        params, buffers = models[group[0]]
        idx = torch.as_tensor(np.concatenate([index_sets[k] for k in group]), device=device)
        owner = torch.as_tensor(np.repeat(np.arange(len(group)), [len(index_sets[k]) for k in group]),
                                device=device)
        hits = torch.cat([functional_call(model, (params, buffers), (dataset.x_train[idx[i:i + 2048]],))
                          .argmax(-1) == dataset.y_train[idx[i:i + 2048]] for i in range(0, len(idx), 2048)])
        counts = torch.zeros(len(group), dtype=torch.long, device=device).index_add_(0, owner, hits.long())
        correct.update(zip(group, counts.tolist(), strict=True))
    for start in range(0, len(singles), chunk):
        group = singles[start:start + chunk]
        sizes = [len(index_sets[k]) for k in group]
        most = max(sizes)
        pad = np.zeros((len(group), most), dtype=np.int64)
        valid = np.zeros((len(group), most), dtype=bool)
        for row, k in enumerate(group):
            pad[row, :sizes[row]] = index_sets[k]
            valid[row, :sizes[row]] = True
        idx = torch.as_tensor(pad, device=device)
        params = tree_stack([models[k][0] for k in group])
        buffers = tree_stack([models[k][1] for k in group])
        x = dataset.x_train[idx.reshape(-1)].view(len(group), most, *dataset.x_train.shape[1:])
        logits = vmap(lambda p, b, xb: functional_call(model, (p, b), (xb,)))(params, buffers, x)
        hits = (logits.argmax(-1) == dataset.y_train[idx]) & torch.as_tensor(valid, device=device)
        correct.update(zip(group, hits.sum(1).tolist(), strict=True))
    return correct


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
        if len(run.part.holdout):
            out.update(evaluate_unseen(method, state.gstate, state.cstates, run.model, run.dataset, run.part))
        if run.has_local_splits:
            personal = evaluate_personal(method, state.gstate, state.cstates, run.model, run.dataset, run.part)
            out.update(personal)
            for extractor in method.extractor_conventions():  # metrics.extractors=both
                out.update(evaluate_personal(method, state.gstate, state.cstates, run.model, run.dataset,
                                             run.part, extractor=extractor))
            if method.has_global_model and method.has_personal_models and method.predicts_with_backbone:
                # both protocols side by side: the global model on the same client splits
                out.update(evaluate_global_on_clients(method, state.gstate, run.model, run.dataset, run.part))
            if personal:
                select = personal.get(names.PERSONAL_VAL_ACC, personal.get(names.PERSONAL_TEST_ACC))
                self.best_personal.update(r, select, personal.get(names.PERSONAL_TEST_ACC))
                out.update({names.BEST_PERSONAL_VAL_ACC: self.best_personal.best_val,
                            names.BEST_PERSONAL_ROUND: self.best_personal.best_round})
        return False, out

    def global_metrics(self, run: Run, state: RunState) -> dict[str, Any]:
        if run.evaluated is not None and run.evaluated[0] == state.round:  # by its fused group
            val, test = run.evaluated[1]
        else:
            val, test = evaluate_global(run.method, state.gstate, run.dataset)
        out = {names.global_metric(split, k): v for split, d in (("val", val), ("test", test)) for k, v in d.items()}
        out.update(sparsity_metrics(run.method, state.gstate, run.dataset))
        task = run.dataset.task
        if names.score(task) in val:  # no validation set (dataset.val_fraction=0): nothing is selected
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
