"""A study's phases: tune every method x setting -> final seeded runs at each best configuration.

Every batch of runs is one `fedbench --multirun` command (a child process) with the study's
launcher, so a study runs wherever a sweep runs (basic, local_parallel, slurm, fused). A trial's
sampled values are a small config file (`+study_trial=FILE`, a `# @package _global_` preset that
also selects the method), so one multirun holds every method's trials of a batch and `seed=...`
sweeps the seeds.

Resumable: each batch's trials are written down before it starts (`batch.json`); a batch whose runs
all ended is not launched again, and a batch that was stopped is relaunched with the same command,
in which fedbench keeps the finished runs and resumes the others from their checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedbench.preflight import ADDED_GROUPS, GROUPS
from fedbench.study.spec import Entry, StudyError, StudySpec
from fedbench.study.tuning import TrialResult, Tuner, sampler_seed, validation_view
from fedbench.tracking.files import write_json

ENDED = (
    "completed",
    "failed",
    "diverged",
)  # a run in another state (preempted, none yet) is unfinished
EXIT_STOPPED = 4


class StudyStopped(Exception):
    """SIGTERM (or Ctrl-C): the running batch was stopped with checkpoints; rerun to continue."""


@dataclass
class RunRecord:
    """One run of a batch: its config file, seed, dir and summary (read when the batch ended)."""

    trial_file: str
    seed: int
    run_dir: Path | None
    summary: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "missing"))


def trial_config(method: Entry, params: dict[str, Any]) -> str:
    """A `# @package _global_` preset: the method's group choices and values, then the trial's
    values. The trial's values come last, so they win over the method's and a setting's preset."""
    from omegaconf import OmegaConf

    defaults, values = [], []
    for o in method.overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") in ADDED_GROUPS:
            raise StudyError(
                f"study method {method.name}: '{o}' adds a preset; give it as a setting"
            )
        if key.lstrip("+") in GROUPS:
            defaults.append({f"override /{key.lstrip('+')}": value})
        else:
            values.append(f"{key.lstrip('+')}={value}")
    values += [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in params.items()]
    merged = OmegaConf.to_container(OmegaConf.from_dotlist(values)) if values else {}
    body = yaml.safe_dump({"defaults": [*defaults, "_self_"], **merged}, sort_keys=False)
    return f"# @package _global_\n# written by fedbench-study\n{body}"


class StudyRunner:
    """Runs the study's multiruns (child processes) and reads their runs back."""

    def __init__(self, spec: StudySpec, root: Path, wandb_group: bool, quiet: bool = False):
        self.spec, self.root, self.wandb_group, self.quiet = spec, root, wandb_group, quiet
        self.conf = root / "conf" / "study_trial"
        self.child: subprocess.Popen | None = None
        self.stopped = False
        self.launched: list[Path] = []  # sweep dirs of the multiruns this process started

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"fedbench-study: {text}", file=sys.stderr, flush=True)

    # --- one batch of runs
    # ---------------------------------------------------------------------------

    def write_trial(self, name: str, method: Entry, params: dict[str, Any]) -> str:
        self.conf.mkdir(parents=True, exist_ok=True)
        path = self.conf / f"{name}.yaml"
        text = trial_config(method, params)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return name

    def command(
        self, setting: Entry, files: list[str], seeds: tuple[int, ...], sweep_dir: Path
    ) -> list[str]:
        spec = self.spec
        search = f"file://{self.root.resolve() / 'conf'}"
        base = list(spec.base)
        for i, o in enumerate(base):  # the user's own search path (plugins) keeps working
            if o.startswith("hydra.searchpath="):
                base[i] = o.rstrip("]") + f",{search}]"
                search = ""
        cmd = [
            sys.executable,
            "-m",
            "fedbench",
            "--multirun",
            *base,
            *setting.overrides,
            f"rounds={spec.rounds}",
            f"hydra.sweep.dir={sweep_dir.resolve()}",
            f"+study_trial={','.join(files)}",
            f"seed={','.join(str(s) for s in seeds)}",
        ]
        if search:
            cmd.append(f"hydra.searchpath=[{search}]")
        if spec.launcher != "basic":
            cmd.append(f"hydra/launcher={spec.launcher}")
        cmd += list(spec.launcher_overrides)
        if self.wandb_group:
            cmd.append(f"logger.wandb.group=study-{spec.name}")
        return cmd

    def launch(
        self, label: str, setting: Entry, files: list[str], seeds: tuple[int, ...], sweep_dir: Path
    ) -> None:
        """Run one multirun to its end; its output goes to SWEEP_DIR/study.log."""
        cmd = self.command(setting, files, seeds, sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, WANDB_MODE=str(self.spec.wandb.get("mode", "offline")))
        started = time.time()
        n = len(files) * len(seeds)
        self.say(
            f"{label}: {n} runs ({self.spec.launcher} launcher; log {sweep_dir / 'study.log'})"
        )
        self.launched.append(sweep_dir)
        with open(sweep_dir / "study.log", "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                code = self.child.wait()
            finally:
                self.child = None
        if self.stopped:
            raise StudyStopped(label)
        if code == 2:
            tail = (sweep_dir / "study.log").read_text().strip().splitlines()[-1:]
            raise StudyError(f"{label}: the multirun refused its config: {' '.join(tail)}")
        self.say(f"{label}: ended in {time.time() - started:.0f} s (exit {code})")

    def stop(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - a signal handler's signature
        """SIGTERM / SIGINT: the running multirun stops after its round with checkpoints."""
        self.stopped = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
        else:
            raise StudyStopped("before a batch")

    def records(
        self, sweep_dir: Path, files: list[str], seeds: tuple[int, ...], tuning: bool
    ) -> dict[tuple[str, int], RunRecord]:
        """(trial file, seed) -> its run, found through each job's .hydra/overrides.yaml; while
        `tuning`, only the validation view of its summary is kept (no test metric is read on)."""
        view = validation_view if tuning else dict
        out = {(f, s): RunRecord(f, s, None, {}) for f in files for s in seeds}
        if not sweep_dir.is_dir():
            return out
        for job in sweep_dir.iterdir():
            ov_file = job / ".hydra" / "overrides.yaml"
            if not job.is_dir() or not ov_file.exists():
                continue
            ov = dict(
                str(o).lstrip("+").split("=", 1) for o in yaml.safe_load(ov_file.read_text()) or []
            )
            key = (ov.get("study_trial"), int(ov.get("seed", -1)))
            if key in out:
                summary_file = job / "summary.json"
                summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
                out[key] = RunRecord(key[0], key[1], job, view(summary))
        return out

    def run_batch(
        self, label: str, setting: Entry, files: list[str], seeds: tuple[int, ...], sweep_dir: Path,
        tuning: bool = False,
    ) -> dict[tuple[str, int], RunRecord]:
        found = self.records(sweep_dir, files, seeds, tuning)
        if all(r.status in ENDED for r in found.values()):
            self.say(f"{label}: done before, kept ({len(found)} runs)")
            return found
        self.launch(label, setting, files, seeds, sweep_dir)
        return self.records(sweep_dir, files, seeds, tuning)

    # --- the phases
    # ----------------------------------------------------------------------------------

    def tune(self, si: int, setting: Entry) -> dict[str, list[TrialResult]]:
        """Every method's trials on one setting, `parallel_trials` at a time (all methods' in one
        batch)."""
        spec = self.spec
        tuners = {
            m.name: Tuner(m.name, m.space, spec.sampler, spec.startup_trials) for m in spec.methods
        }
        results: dict[str, list[TrialResult]] = {m.name: [] for m in spec.methods}
        batches = range(0, spec.trials, spec.parallel_trials)
        for b, first in enumerate(batches):
            numbers = list(range(first, min(first + spec.parallel_trials, spec.trials)))
            sweep_dir = self.root / "tune" / setting.name / f"batch-{b:03d}"
            plan_file = sweep_dir / "batch.json"
            # asked before a stop: the same trials (a rebuilt tuner would ask them again)
            if plan_file.exists():
                plan = json.loads(plan_file.read_text())
            else:
                plan = {"setting": setting.name, "batch": b, "trials": []}
                for m in spec.methods:
                    asked = tuners[m.name].ask(
                        len(numbers), sampler_seed(spec.sampler_seed, setting.name, m.name, b)
                    )
                    plan["trials"] += [
                        {
                            "method": m.name,
                            "number": k,
                            "params": p,
                            "file": f"s{si}-{m.name}-t{k:03d}",
                        }
                        for k, p in zip(numbers, asked, strict=True)
                    ]
                sweep_dir.mkdir(parents=True, exist_ok=True)
                write_json(plan_file, plan)
            methods = {m.name: m for m in spec.methods}
            files = [
                self.write_trial(t["file"], methods[t["method"]], t["params"])
                for t in plan["trials"]
            ]
            found = self.run_batch(
                f"tune {setting.name} batch {b + 1}/{len(batches)}",
                setting,
                files,
                spec.tune_seeds,
                sweep_dir,
                tuning=True,
            )
            for t in plan["trials"]:
                result = TrialResult(
                    t["number"],
                    t["params"],
                    {s: found[(t["file"], s)].summary for s in spec.tune_seeds},  # validation only
                )
                tuners[t["method"]].tell(result)
                results[t["method"]].append(result)
        self.record_trials(setting, results)
        return results

    def record_trials(self, setting: Entry, results: dict[str, list[TrialResult]]) -> None:
        rows = [
            {
                "method": m,
                "trial": r.number,
                "params": r.params,
                "objective": r.objective,
                "failures": r.failures,
                "values": {str(s): v.get("status") for s, v in r.runs.items()},
            }
            for m, rs in results.items()
            for r in rs
        ]
        write_json(self.root / "tune" / setting.name / "trials.json", rows)

    def final(
        self, si: int, setting: Entry, tuned: dict[str, list[TrialResult]]
    ) -> tuple[dict[str, Any], dict[tuple[str, int], RunRecord]]:
        """The seeded runs of every method at its best trial's values (no test metric read
        before)."""
        spec = self.spec
        sweep_dir = self.root / "final" / setting.name
        plan: dict[str, Any] = {}
        for m in spec.methods:
            done = [r for r in tuned[m.name] if r.objective is not None]
            best = max(done, key=lambda r: (r.objective, -r.number)) if done else None
            plan[m.name] = (
                None
                if best is None
                else {
                    "trial": best.number,
                    "params": best.params,
                    "objective": best.objective,
                    "file": f"s{si}-{m.name}-best",
                }
            )
        methods = {m.name: m for m in spec.methods}
        files = [
            self.write_trial(p["file"], methods[name], p["params"])
            for name, p in plan.items()
            if p
        ]
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_json(sweep_dir / "plan.json", plan)
        found = (
            self.run_batch(f"final {setting.name}", setting, files, spec.seeds, sweep_dir)
            if files
            else {}
        )
        return plan, found
