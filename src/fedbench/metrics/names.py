"""Every metric name fedbench writes, in one place. Rows (metrics.jsonl, W&B history), summary.json
and the report use these; a classifier's score is `acc`, a regressor's `r2` (never written under
`_acc`).
"""

from __future__ import annotations

from collections.abc import Callable

ROUND = "round"

# the round's bookkeeping (run/loop.py)
PARTICIPANTS = "clients/participants"
BYTES_UP = "comm/bytes_up"
BYTES_DOWN = "comm/bytes_down"
BYTES_UP_TOTAL = "comm/bytes_up_total"
BYTES_DOWN_TOTAL = "comm/bytes_down_total"
BYTES_TOTAL = "comm/bytes_total"
BYTES_PER_ROUND = "comm/bytes_per_round"
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"  # the round's client learning rate (with an lr_schedule)
ROUND_S = "time/round_s"
TOTAL_S = "time/total_s"
STARTUP_S = "time/startup_s"
WALL_S = "time/wall_s"
SAMPLES_PER_S = "throughput/samples_per_s"
# client-steps computed / client-steps with data: > 1 where a vmap group runs to its longest client
PADDING_FACTOR = "throughput/padding_factor"
# local minibatch steps with data, summed over the round's cohort / over all rounds (a study's budget)
CLIENT_STEPS = "train/client_steps"
CLIENT_STEPS_TOTAL = "train/client_steps_total"
# who took part (run/participation.py): per round where the federation is not the idealised one
# (PARTICIPANTS above: the clients whose update arrived), per run in the summary
AVAILABLE = "clients/available"
SAMPLED = "clients/sampled"
DROPPED = "clients/dropped"
STRAGGLERS = "clients/stragglers"
PARTICIPATION_SAMPLED_MEAN = "participation/sampled_mean"   # rounds sampled, mean over clients
PARTICIPATION_SAMPLED_MIN = "participation/sampled_min"
PARTICIPATION_NEVER_SAMPLED = "participation/never_sampled"  # clients (not held out) never sampled
PARTICIPATION_DROPPED = "participation/dropped_total"       # dropped updates over the run
PARTICIPATION_STRAGGLED = "participation/straggled_total"
PEAK_RSS_MB = "memory/peak_rss_mb"
PEAK_DEVICE_MB = "memory/peak_device_mb"

# personal/*: each client's own model on its own splits (weighted by split size, spread over
# clients)
PERSONAL_VAL_ACC = "personal/val_acc"
PERSONAL_TEST_ACC = "personal/test_acc"
BEST_PERSONAL_VAL_ACC = "best/personal_val_acc"
BEST_PERSONAL_TEST_ACC = "best/personal_test_acc"
BEST_PERSONAL_ROUND = "best/personal_round"

# the best global model, chosen on validation (run/evaluation.py)
BEST_ROUND = "best/round"
ROUNDS_TO_TARGET = "rounds_to_target"
TARGET = "metrics.target"

# sparsity/* of the final gated model
DENSITY = "sparsity/density"
EXPECTED_DENSITY = "sparsity/expected_density"
N_GATED = "sparsity/n_gated"
NNZ = "sparsity/nnz"
TDR = "sparsity/tdr"


# classification: one label per sample (softmax) | regression | multilabel: any number of labels per
# sample (a sigmoid per label, RCV1)
TASKS = ("classification", "regression", "multilabel")


def score(task: str) -> str:
    """The name of the task's headline score: `acc` for classification, `r2` for regression, `f1`
    (micro-averaged over every label decision) for multilabel."""
    return {"regression": "r2", "multilabel": "f1"}.get(task, "acc")


def final_metrics(task: str) -> tuple[str, ...]:
    """The global model's metrics a run's summary keeps from its last evaluation (final/*)."""
    return {"regression": ("r2", "mse"), "multilabel": ("f1", "hamming_acc", "loss")}.get(task, ("acc", "loss"))


def global_metric(split: str, name: str) -> str:
    """The global model's metric on a global split, e.g. global/val_acc, global/test_mse."""
    return f"global/{split}_{name}"


def global_val(task: str) -> str:
    return global_metric("val", score(task))


def best_val(task: str) -> str:
    """The best validation score so far (best/val_acc, best/val_r2)."""
    return f"best/val_{score(task)}"


def best_test(task: str) -> str:
    """The test score at the round of the best validation score."""
    return f"best/test_{score(task)}"


def final(split: str, name: str) -> str:
    """The global model's metric at the last evaluated round (summary only), e.g. final/test_acc."""
    return f"final/{split}_{name}"


def personal(split: str, stat: str = "") -> str:
    """personal/val_acc, personal/test_acc_std, personal/test_acc_min ..."""
    return f"personal/{split}_acc{'_' + stat if stat else ''}"


def personal_with(extractor: str) -> Callable[..., str]:
    """name(split, stat) of personal models scored with the global or each client's own extractor
    (metrics.extractors=both): personal_global/test_acc, personal_own/test_acc_std ..."""
    return lambda split, stat="": f"personal_{extractor}/{split}_acc{'_' + stat if stat else ''}"


def global_on_clients(split: str, stat: str = "") -> str:
    """The global model on each client's own split (methods with personal models too):
    clients/global_test_acc, clients/global_test_acc_std ..."""
    return f"clients/global_{split}_acc{'_' + stat if stat else ''}"


def unseen(stat: str) -> str:
    """Clients that never trained (partition.holdout_clients): unseen/global_acc, unseen/personal_acc,
    unseen/global_acc_std ..."""
    return f"unseen/{stat}"


def selection_metric(task: str, has_global_model: bool) -> str:
    """The metric a run is judged on while it runs (early stopping, the progress line): the global
    model's validation score, or the clients' own models' where a method has no global model."""
    return global_val(task) if has_global_model else PERSONAL_VAL_ACC


# the best-validation keys of both tasks and of personal models (sweep objectives, console headline)
BEST_VALIDATION_KEYS = (*dict.fromkeys(best_val(t) for t in TASKS), BEST_PERSONAL_VAL_ACC)
