"""pfl-research's own FedAvg on a workload written by scripts/bench_peers.py (run with pfl's venv; with
torchrun for several processes). Written from pfl's documented API: PyTorchModel (a module with `loss` and
`metrics`), FederatedDataset over user ids, SimulatedBackend, FederatedAveraging, a timing callback.

    python pfl_harness.py DATA.npz OUT.json --model cnn --rounds 8 --cohort 10 --batch 10 --lr 0.05
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch

# pfl is imported in the functions that use it: `Net` also serves scripts/bench_peers.py's plain
# PyTorch loop, in a venv without pfl


class Net(torch.nn.Module):
    """The same architectures as fedbench's `logreg` and `cnn` backbones, with pfl's loss/metrics."""

    def __init__(self, kind: str, shape: tuple, classes: int):
        super().__init__()
        if kind == "logreg":
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(shape)), classes))
        elif kind == "simple_cnn":  # pfl's benchmark CNN, NCHW inputs, without its dropout (as fedbench's)
            c, h, _ = shape
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(c, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64 * ((h - 4) // 2) ** 2, 128),
                torch.nn.ReLU(), torch.nn.Linear(128, classes))
        else:
            c, h, w = shape
            flat = 64 * (h // 4) * (w // 4)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(c, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(32, 64, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Flatten(), torch.nn.Linear(flat, 512), torch.nn.ReLU(), torch.nn.Linear(512, classes))

    def forward(self, x):
        return self.net(x)

    def loss(self, x, y, eval=False):  # noqa: A002 - pfl's keyword
        self.eval() if eval else self.train()
        return torch.nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # noqa: A002
        from pfl.metrics import Weighted

        self.eval()
        logits = self(x)
        n = len(y)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        return {"loss": Weighted(loss, n), "accuracy": Weighted((logits.argmax(1) == y).sum().item(), n)}


def make_timer():
    from pfl.callback.base import TrainingProcessCallback
    from pfl.metrics import Metrics

    class Timer(TrainingProcessCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *, model):
            self.marks.append(time.perf_counter())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.marks.append(time.perf_counter())
            return False, Metrics()

    return Timer()


def main() -> None:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--cohort", type=int, default=10)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-setup", default="slices", choices=["slices", "per-user"])
    ap.add_argument("--compile", action="store_true", help="PyTorchModel(use_torch_compile=True)")
    a = ap.parse_args()
    started = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    blob = np.load(a.data)
    x, y, owner = torch.from_numpy(blob["x"]), torch.from_numpy(blob["y"]), blob["owner"]
    users = sorted(set(owner.tolist()))
    index = {u: np.flatnonzero(owner == u) for u in users}
    if a.data_setup == "slices":
        # pfl's own benchmarks (benchmarks/dataset/cifar10/numpy.py): every user's tensors made once,
        # FederatedDataset.from_slices
        slices = {u: (x[index[u]].contiguous(), y[index[u]].contiguous()) for u in users}
        data = FederatedDataset.from_slices(slices, get_user_sampler("random", users))
    else:  # a Dataset built per sampled user (pfl's generic constructor)
        data = FederatedDataset(lambda u: Dataset((x[index[u]], y[index[u]]), user_id=str(u)),
                                get_user_sampler("random", users),
                                user_id_to_weight={u: len(index[u]) for u in users})
    torch.manual_seed(0)
    net = Net(a.model, tuple(x.shape[1:]), int(blob["classes"]))
    model = PyTorchModel(net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), 1.0),
                         use_torch_compile=a.compile)
    timer = make_timer()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=a.rounds, evaluation_frequency=a.rounds + 1,
                                           train_cohort_size=a.cohort, val_cohort_size=0),
        backend=SimulatedBackend(training_data=data, val_data=None, postprocessors=[]),
        model=model, model_train_params=NNTrainHyperParams(local_learning_rate=a.lr, local_num_epochs=1,
                                                            local_batch_size=a.batch),
        model_eval_params=NNEvalHyperParams(local_batch_size=256), callbacks=[timer])
    rounds = np.diff(timer.marks).tolist()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        per_round = a.cohort * int(np.mean([len(v) for v in index.values()]))
        steady = statistics.median(rounds[1:])
        json.dump({"round_s": rounds, "steady_round_s": steady, "samples_per_s": per_round / steady,
                   "startup_s": timer.marks[0] - started, "threads": torch.get_num_threads(),
                   "processes": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1},
                  open(a.out, "w"))


if __name__ == "__main__":
    main()
