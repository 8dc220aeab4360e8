"""`fedbench-study`: a fair comparison table from one command.

    fedbench-study quick                           # conf/study/quick.yaml -> studies/quick/
    fedbench-study quick budget.trials=8 launcher=fused --dir studies/quick8
    fedbench-study path/to/my_study.yaml

Phases (each resumable: the same command continues a stopped study and redoes nothing finished):
tune every method x setting with the same budget on validation only -> rerun each method's best
configuration over the final seeds -> the table (study.md, study.csv, study.json, plots, and a W&B
summary run in the study's group)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from fedbench.study.phases import EXIT_STOPPED, RunRecord, StudyRunner, StudyStopped
from fedbench.study.spec import Param, StudyError, StudySpec, as_yaml, load_study
from fedbench.study.tuning import TrialResult

EXIT_CONFIG = 2


def _ends(p: Param) -> tuple[Any, Any]:
    return (p.choices[0], p.choices[-1]) if p.kind == "categorical" else (p.low, p.high)


def _value(v: Any) -> str:
    """A value as a Hydra override writes it (strings quoted: they may hold commas)."""
    return f"'{v}'" if isinstance(v, str) else str(v)


def check_runs(spec: StudySpec, checked: bool = False) -> bool:
    """Compose and check a run of every method x setting at both ends of its search space before any
    run starts (fedbench's own pre-flight; `checked`: a resumed study, checked when it started);
    returns whether the runs log to W&B (they then join the study's W&B group)."""
    from hydra import compose, initialize_config_module

    from fedbench.preflight import preflight

    for setting in spec.settings if not checked else ():
        for m in spec.methods:  # one pre-flight sweep per method: the space's ends (one dry build)
            ends = [f"{p.key}={','.join(_value(v) for v in _ends(p))}" for p in m.space]
            job = [
                *spec.base,
                *setting.overrides,
                *m.overrides,
                *ends,
                f"rounds={spec.rounds}",
                f"seed={spec.tune_seeds[0]}",
            ]
            msg = preflight(["--multirun", *job])
            if msg:
                raise StudyError(f"study setting {setting.name}, method {m.name}: {msg}")
    job = [*spec.base, *spec.settings[0].overrides, *spec.methods[0].overrides]
    with initialize_config_module(config_module="fedbench.conf", version_base="1.3"):
        wandb = "wandb" in list(compose("config", overrides=job).logger.get("sinks", []))
    return wandb


def claim_dir(spec: StudySpec, root: Path) -> bool:
    """The study dir holds this study (True: it was started before) or nothing yet (False); a
    different definition is refused."""
    text = as_yaml(spec)
    path = root / "study.yaml"
    if path.exists():
        if path.read_text() != text:
            raise StudyError(
                f"{root} holds a different study (its study.yaml differs from this "
                f"definition); give another --dir, or remove it to start over"
            )
        return True
    return False


def run_study(spec: StudySpec, root: Path, quiet: bool = False) -> dict[str, Any]:
    """All phases, then the table; returns what the table module wrote."""
    resumed = claim_dir(spec, root)
    wandb_group = check_runs(spec, checked=resumed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.yaml").write_text(
        as_yaml(spec)
    )  # after the checks: a refused study leaves no dir

    runner = StudyRunner(spec, root, wandb_group, quiet)
    previous = {s: signal.signal(s, runner.stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        tuned: dict[str, dict[str, list[TrialResult]]] = {}
        for si, setting in enumerate(spec.settings):
            tuned[setting.name] = runner.tune(si, setting)
        plans: dict[str, dict[str, Any]] = {}
        finals: dict[str, dict[tuple[str, int], RunRecord]] = {}
        for si, setting in enumerate(spec.settings):
            plans[setting.name], finals[setting.name] = runner.final(
                si, setting, tuned[setting.name]
            )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    from fedbench.study.report import write_table

    return write_table(spec, root, tuned, plans, finals)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="fedbench-study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "study", help="a study in conf/study/ (e.g. quick) or a path to a study YAML file"
    )
    ap.add_argument(
        "overrides", nargs="*", help="KEY=VALUE changes to the study (budget.trials=8 ...)"
    )
    ap.add_argument("--dir", default=None, help="the study's dir (default: studies/NAME)")
    a = ap.parse_args(argv)
    try:
        spec = load_study(a.study, a.overrides)
        root = Path(a.dir) if a.dir else Path("studies") / spec.name
        out = run_study(spec, root)
    except StudyError as e:
        print(f"fedbench-study: error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except StudyStopped:
        print(
            "fedbench-study: stopped (running runs checkpointed); "
            "rerun the same command to continue",
            file=sys.stderr,
        )
        sys.exit(EXIT_STOPPED)
    print(out["markdown"])
    print(f"fedbench-study: table, plots and study.json in {out['dir']}", file=sys.stderr)


if __name__ == "__main__":
    main()
