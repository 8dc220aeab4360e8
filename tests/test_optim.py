"""Server optimizers (FedOpt) against the paper's update written here independently, client
learning-rate schedules against their formulas, and the one optimizer's eager and vmapped paths
against each other."""

import math

import pytest
import torch

from conftest import compose_cfg, read_jsonl
from fedbench.engine.optim import LrSchedule, Optimizer
from fedbench.engine.protocol import RoundContext
from fedbench.experiment import run_experiment
from fedbench.methods.fedavg import FedAvg
from fedbench.methods.local_sgd import LocalSGDConfig

ETA, B1, B2, TAU = 0.03, 0.9, 0.99, 1e-3


def reddi_server(kind: str, x: dict, deltas: list[dict]) -> dict:
    """Reddi et al. 2021, Algorithm 2 (FedAdagrad / FedAdam / FedYogi), on the rounds' mean
    deltas."""
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.full_like(t, TAU**2) for k, t in x.items()}
    for delta in deltas:
        for k in x:
            d = delta[k]
            m[k] = B1 * m[k] + (1 - B1) * d
            if kind == "adagrad":
                v[k] = v[k] + d**2
            elif kind == "adam":
                v[k] = B2 * v[k] + (1 - B2) * d**2
            else:
                v[k] = v[k] - (1 - B2) * d**2 * torch.sign(v[k] - d**2)
            x = {**x, k: x[k] + ETA * m[k] / (torch.sqrt(v[k]) + TAU)}
    return x


@pytest.mark.parametrize("kind", ["adagrad", "adam", "yogi"])
def test_fedopt_server_equals_the_papers_update(kind):
    gen = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    method = FedAvg(
        LocalSGDConfig(
            name="fedavg",
            server_opt=kind,
            server_lr=ETA,
            server_beta1=B1,
            server_beta2=B2,
            server_eps=TAU,
        )
    )
    gstate = method.init_global(params, {})
    x, deltas = dict(params), []
    for r in range(1, 4):
        sizes = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)
        up = {
            "params": {
                k: v + 0.1 * torch.randn(3, *v.shape, generator=gen, dtype=torch.float64)
                for k, v in gstate["params"].items()
            },
            "buffers": {},
        }
        ctx = RoundContext(r, torch.arange(3), sizes, 10, 3)
        mean = {
            k: (
                up["params"][k] * (sizes / sizes.sum()).view(-1, *[1] * (up["params"][k].dim() - 1))
            ).sum(0)
            for k in params
        }
        deltas.append({k: mean[k] - gstate["params"][k] for k in params})
        gstate, _ = method.aggregate(gstate, up, ctx)
    want = reddi_server(kind, x, deltas)
    for k in params:
        torch.testing.assert_close(gstate["params"][k], want[k], rtol=1e-12, atol=1e-13)


def test_fedavgm_is_heavy_ball_on_the_mean_delta():
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    method = FedAvg(
        LocalSGDConfig(name="fedavg", server_opt="momentum", server_momentum=0.5, server_lr=2.0)
    )
    gstate, mom, x = (
        method.init_global(params, {}),
        torch.zeros(2, dtype=torch.float64),
        params["w"],
    )
    for r, step in enumerate(([1.0, -1.0], [0.5, 0.25], [0.0, 2.0]), start=1):
        delta = torch.tensor(step, dtype=torch.float64)
        new = {"params": {"w": (gstate["params"]["w"] + delta).unsqueeze(0)}, "buffers": {}}
        gstate, _ = method.aggregate(
            gstate, new, RoundContext(r, torch.arange(1), torch.ones(1), 1, 3)
        )
        mom = 0.5 * mom + delta
        x = x + 2.0 * mom
        torch.testing.assert_close(gstate["params"]["w"], x, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_client_optimizer_eager_in_place_equals_vmapped(kind):
    opt = Optimizer(kind, lr=0.1, momentum=0.9 if kind == "sgd" else 0.0, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)}
    grads = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)}
    mask = {"w": (torch.rand(5, 3, generator=gen) > 0.3).to(torch.float64)}

    def one(p, g, m):
        state = opt.init({"w": p})
        for _ in range(3):
            state, new = opt.apply({"w": g}, state, {"w": p}, mask={"w": m})
            p = new["w"]
        return p

    batched = torch.func.vmap(one)(params["w"], grads["w"], mask["w"])
    for i in range(5):
        p = {"w": params["w"][i].clone()}
        state = opt.init(p)
        for _ in range(3):
            state, p = opt.apply(
                {"w": grads["w"][i]}, state, p, mask={"w": mask["w"][i]}, inplace=True
            )
        torch.testing.assert_close(p["w"], batched[i], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "name,want",
    [
        ("constant", lambda r: 0.2),
        ("step", lambda r: 0.2 * 0.5 ** ((r - 1) // 3)),
        ("exponential", lambda r: 0.2 * 0.5 ** (r - 1)),
        ("cosine", lambda r: 0.01 + (0.2 - 0.01) * (1 + math.cos(math.pi * (r - 1) / 7)) / 2),
    ],
)
def test_lr_schedules_give_the_documented_rate_per_round(name, want):
    schedule = LrSchedule(name=name, gamma=0.5, step_rounds=3, min_lr=0.01)
    assert [schedule(0.2, r, 7) for r in range(1, 8)] == pytest.approx(
        [want(r) for r in range(1, 8)], rel=1e-15
    )


def test_a_run_trains_with_the_scheduled_rate(tmp_path, tiny):
    """The rows log each round's rate; a schedule that keeps the rate equals the constant run."""
    sched = [
        "lr=0.08",
        "lr_schedule.name=step",
        "lr_schedule.gamma=0.5",
        "lr_schedule.step_rounds=1",
        "rounds=3",
        "hardware.dtype=float64",
    ]
    run_experiment(compose_cfg(tiny + sched), tmp_path / "step")
    rows = read_jsonl(tmp_path / "step" / "metrics.jsonl")
    assert [r["train/lr"] for r in rows] == [0.08, 0.04, 0.02]
    flat = ["lr=0.08", "rounds=3", "hardware.dtype=float64"]
    run_experiment(compose_cfg(tiny + flat), tmp_path / "flat")
    run_experiment(
        compose_cfg(tiny + flat + ["lr_schedule.name=exponential", "lr_schedule.gamma=1.0"]),
        tmp_path / "gamma1",
    )
    flat_rows = read_jsonl(tmp_path / "flat" / "metrics.jsonl")
    same = read_jsonl(tmp_path / "gamma1" / "metrics.jsonl")
    assert [r["global/val_loss"] for r in same] == [r["global/val_loss"] for r in flat_rows]
    # round 1 runs at 0.08 in both; round 2 at 0.04 only in the step run
    assert rows[0]["train/loss"] == flat_rows[0]["train/loss"]
    assert rows[1]["global/val_loss"] != flat_rows[1]["global/val_loss"]


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_fedopt_runs_resume_exactly(tmp_path, tiny, kind):
    """The server optimizer's moments live in the global state: a preempted run resumes to the same
    result as an uninterrupted one."""
    from fedbench.errors import Preempted

    cfg = compose_cfg(
        tiny
        + [
            "rounds=4",
            f"method.server_opt={kind}",
            "method.server_lr=0.05",
            "hardware.dtype=float64",
        ]
    )
    run_experiment(cfg, tmp_path / "whole")
    with pytest.raises(Preempted):
        run_experiment(cfg, tmp_path / "part", stop_after=2)
    run_experiment(cfg, tmp_path / "part")
    a = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "part" / "metrics.jsonl")
    assert [r["global/val_loss"] for r in a] == [r["global/val_loss"] for r in b]
