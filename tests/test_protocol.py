"""The method protocol and the run loop: a method defined outside the package is one module + one YAML
and runs through the CLI; every registered method resumes exactly; no probing of method objects; small
functions; typed method configs."""

import ast
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten

from conftest import compose_cfg, read_jsonl, run_cli
from fedbench.config import build_config
from fedbench.errors import ConfigError, Preempted
from fedbench.experiment import run_experiment
from fedbench.registry import lookup, names

SRC = Path(__file__).resolve().parents[1] / "src" / "fedbench"

# FedNova (Wang et al. 2020) as a plugin: the whole method, in one module, written by a user
FEDNOVA = textwrap.dedent('''
    """FedNova: clients upload their update normalised by their number of local steps; the server
    rescales the averaged direction by the mean number of steps (normalised averaging)."""
    import dataclasses

    from fedbench.engine.functional import weighted_mean
    from fedbench.methods.local_sgd import LocalSGDConfig, LocalSGDMethod
    from fedbench.registry import register


    @dataclasses.dataclass(frozen=True)
    class FedNovaConfig(LocalSGDConfig):
        tau_scale: float = 1.0   # multiplies the effective number of steps


    @register("method", "fednova")
    class FedNova(LocalSGDMethod):
        name = "fednova"
        Config = FedNovaConfig

        def client_final(self, local, down, cstate):
            steps = local["steps"].clamp_min(1.0)
            d = {k: (down["params"][k] - local["params"][k]) / steps for k in down["params"]}
            return {"d": d, "steps": local["steps"], "buffers": local["buffers"]}, {}

        def aggregate(self, gstate, up, ctx):
            p = ctx.sizes / ctx.sizes.sum()
            tau = self.cfg.tau_scale * (p * up["steps"]).sum()
            d = weighted_mean(up["d"], ctx.sizes)
            new = self.server_apply(gstate, {k: -tau * d[k] for k in d})
            new["buffers"] = weighted_mean(up["buffers"], ctx.sizes)
            return new, {"fednova/tau_eff": tau}
''')
FEDNOVA_YAML = textwrap.dedent('''
    # FedNova preset (a plugin method): defaults from its Config dataclass
    defaults:
      - /method_schema/fednova@_here_
      - _self_
''')


def test_a_method_is_one_module_and_one_yaml_run_through_the_cli(tmp_path):
    (tmp_path / "fedbench_test_fednova.py").write_text(FEDNOVA)
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "fednova.yaml").write_text(FEDNOVA_YAML)
    common = ["dataset=digits", "backbone=logreg", "clients=6", "rounds=3", "participation=0.5", "local_steps=3",
              "hardware=cpu", "hardware.dtype=float64", "logger=local", "progress=false"]
    env = {"PYTHONPATH": str(tmp_path), "FEDBENCH_PLUGINS": "fedbench_test_fednova"}
    nova = run_cli(common + ["method=fednova", "method.server_lr=1.0", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                             f"hydra.run.dir={tmp_path / 'nova'}"], tmp_path, env)
    assert nova.returncode == 0, nova.stderr[-3000:]
    run_experiment(compose_cfg(common + ["method=fedavg"]), tmp_path / "avg")  # the reference, in this process
    # every client takes the same 3 steps: FedNova's normalised averaging is exactly FedAvg
    a = torch.load(tmp_path / "nova" / "checkpoint.pt", weights_only=False)["gstate"]["params"]
    b = torch.load(tmp_path / "avg" / "checkpoint.pt", weights_only=False)["gstate"]["params"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
    rows = read_jsonl(tmp_path / "nova" / "metrics.jsonl")
    assert [r["fednova/tau_eff"] for r in rows] == [3.0, 3.0, 3.0]  # the method's own metric is logged
    # its own keys are typed and checked like a built-in method's
    bad = run_cli(common + ["method=fednova", "method.tau_scale=abc",
                            f"hydra.searchpath=[file://{tmp_path / 'conf'}]"], tmp_path, env)
    assert bad.returncode == 2 and "method.tau_scale='abc': must be a number" in bad.stderr, bad.stderr[-2000:]


# small settings per method family; every run in float64 so the comparison is exact
BASE = ["dataset=digits", "backbone=mlp", "backbone.hidden=[16]", "clients=5", "participation=0.5", "rounds=4",
        "batch_size=16", "partition=noniid_s", "hardware=cpu", "hardware.dtype=float64", "logger=local",
        "progress=false", "checkpoint_every=1"]
ANALYTIC = ["dataset=digits", "clients=4", "partition=iid", "hardware=cpu", "hardware.dtype=float64",
            "logger=local", "progress=false", "checkpoint_every=1"]
PER_METHOD = {
    "afl": ANALYTIC + ["method=afl"],
    "deepafl": ANALYTIC + ["method=deepafl", "method.T=1", "method.h=16", "method.f=8", "rounds=3"],
    "flops": BASE + ["method=flops", "method.prune_start=2"],
    "flops_pa": BASE + ["method=flops_pa", "method.prune_start=2"],
    "fedsq": BASE + ["method=fedsq", "warm_start.epochs=1"],
    "fedht": BASE + ["method=fedht", "method.target_density=0.2"],
    "fediterht": BASE + ["method=fediterht", "method.target_density=0.2"],
    "fedavg_prune": BASE + ["method=fedavg_prune", "method.target_density=0.2"],
    "fedrep": BASE + ["method=fedrep", "method.head_epochs=1", "method.body_epochs=1"],
    "fedpac": BASE + ["method=fedpac", "method.body_epochs=1"],
}


def leaves(tree):
    return tree_flatten(tree)[0]


def not_timed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))} for r in rows]


@pytest.mark.parametrize("method", names("method"))
def test_every_method_resumes_exactly_after_a_preemption(tmp_path, method):
    overrides = PER_METHOD.get(method, BASE + [f"method={method}"])
    cfg = compose_cfg(overrides)
    rounds = int(cfg.rounds)
    full = run_experiment(cfg, tmp_path / "full")
    part = tmp_path / "part"
    if rounds > 1:
        with pytest.raises(Preempted):
            run_experiment(compose_cfg(overrides), part, stop_after=rounds // 2)
        assert json.loads((part / "summary.json").read_text())["status"] == "preempted"
    resumed = run_experiment(compose_cfg(overrides), part)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    for x, y in zip(leaves([a["gstate"], a["cstates"]]), leaves([b["gstate"], b["cstates"]]), strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert not_timed(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == not_timed(read_jsonl(part / "metrics.jsonl"))
    drop = ("time/", "throughput/", "memory/", "run_dir")
    assert {k: v for k, v in full.items() if not k.startswith(drop)} == \
           {k: v for k, v in resumed.items() if not k.startswith(drop)}


def test_no_method_object_is_probed_with_hasattr_or_getattr():
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\b(hasattr|getattr)\(\s*(self|method|m|run\.method)\b", line)]
    assert not hits, hits


def test_functions_are_short_and_the_round_loop_fits_on_a_screen():
    long = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80 or (node.name == "run_rounds" and n > 40):
                    long.append(f"{p.relative_to(SRC)}:{node.name} {n} lines")
    assert not long, long


def test_method_defaults_are_written_once_and_keys_are_typed():
    cfg = compose_cfg(["method=flops"])
    assert cfg.method.scale_factor == 0.5 and cfg.method.prune_start == 100  # preset over the dataclass default
    flops = lookup("method", "flops")
    assert flops.Config().scale_factor == 0.5  # the one default (it had drifted to 1.0 in the code)
    with pytest.raises(ConfigError, match="method.mu=.*must be a number"):
        build_config(lookup("method", "fedprox").Config, {"name": "fedprox", "mu": "abc"})
    with pytest.raises(ConfigError, match="method.muu: unknown key"):
        build_config(lookup("method", "fedprox").Config, {"name": "fedprox", "muu": 1.0})
    for name in names("method"):  # every YAML preset composes onto its schema and builds a valid config
        yaml = "deepafl" if name == "deepafl" else name
        build_config(lookup("method", name).Config, dict(compose_cfg([f"method={yaml}"]).method))


def test_an_unknown_method_key_on_the_command_line_is_one_line(tmp_path):
    proc = run_cli(["dataset=digits", "backbone=logreg", "method=fedprox", "method.muu=1"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedbench: error:")]
    assert errors == ["fedbench: error: method.muu: unknown key; allowed: bn, momentum, mu, name, normalize, "
                      "server_beta1, server_beta2, server_eps, server_lr, server_momentum, server_opt, "
                      "weight_decay"], proc.stderr


def test_the_fedavg_family_always_aggregates_by_shares():
    """A FedAvg-family method changes the result after the mean in `post_aggregate`, never by replacing
    `aggregate`, so a sharded round all-reduces; `aggregates_by_shares` is derived, not set by hand."""
    from fedbench.methods.local_sgd import LocalSGDMethod
    from fedbench.registry import table

    for name, cls in table("method").items():
        family = issubclass(cls, LocalSGDMethod)
        replaced = family and cls.aggregate is not LocalSGDMethod.aggregate
        assert cls.aggregates_by_shares == (family and not replaced), name
    shares = sorted(n for n, c in table("method").items() if c.aggregates_by_shares)
    assert shares == ["fedavg", "fedavg_prune", "fedht", "fediterht", "fedprox", "fedsq", "scaffold"]
