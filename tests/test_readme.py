"""The README's commands run as written: every `fedbench` command in it (code blocks and inline) goes
through the real pre-flight (composition, every check, the dry build on the data) and passes, or, where
it needs what this machine lacks (a dataset download, a GPU, another cluster), stops with the one line
the README promises. Commands no test can run here (make, wandb sync, the benchmarks) are listed in
docs/readme_checks.md with the manual check made."""

import re
import shlex
import sys
from pathlib import Path

import pytest

from fedbench import cli

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDERS = {"NAME": "flops_synthetic_logistic", "BEST": "0.05", "DATASET": "digits"}
# commands that need what this machine lacks: the one line they must stop with here
NEEDS = {
    "hydra.launcher.partition=gpu": "hydra.launcher.partition=gpu: no such partition",
    "+experiment=afl_cifar10": "dataset.path=uoft-cs/cifar10",
    "+experiment=fedpac_cifar10": "dataset.path=uoft-cs/cifar10",
    "+experiment=flops_rcv1": "rcv1_topics_train.svm.bz2 not found",
    "dataset=femnist_hf": "dataset.path=flwrlabs/femnist",
    "hardware=cuda": "CUDA is not available",
    "method=fedfoo": "method='fedfoo' is unknown",
    "partition.alpha=0": "partition.alpha=0: must be a finite number > 0",
    "progress=no": "progress='no': must be true or false",
    "methd=fedavg": "methd: unknown key or config group; did you mean method?",
    "method=fedper": "method=fedper has no global model",
}
NOT_HERE = ("make ", "wandb sync", "python scripts/", "python -c", "fedbench-report")  # docs/readme_checks.md


def commands() -> list[str]:
    text = README.read_text()
    found = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.split(r"\s+#\s", line)[0].strip()
            command = re.match(r"([A-Z_]+=\S+\s+)*(fedbench\b|fedbench-report|python\b|torchrun\b|make\b|wandb\b)",
                               line)
            if command and not line.startswith(("fedbench:", "fedbench summary")):
                found.append(line)
    found += [c for c in re.findall(r"`(fedbench [^`]+)`", text) if not c.split()[1].endswith(":")]  # not output
    return sorted(set(found))


def fedbench_args(line: str) -> list[str] | None:
    """The arguments `fedbench` receives from a README line (None: not a fedbench run)."""
    words = shlex.split(line)
    for i, w in enumerate(words):
        if w == "fedbench":  # also `python -m fedbench`, `torchrun ... -m fedbench`, `VAR=... fedbench`
            args = words[i + 1:]
            break
    else:
        return None
    if "..." in args:
        return None
    return [substitute(a) for a in args]


def substitute(arg: str) -> str:
    """The README's placeholders (NAME, BEST, DATASET) as values that run here."""
    key, eq, value = arg.partition("=")
    return f"{key}={PLACEHOLDERS.get(value, value)}" if eq else arg


def test_the_readme_has_commands_and_each_is_covered():
    lines = commands()
    assert len([line for line in lines if fedbench_args(line) is not None]) >= 20
    manual = (Path(__file__).resolve().parents[1] / "docs" / "readme_checks.md").read_text()
    for line in lines:
        if fedbench_args(line) is None and "..." not in line and not line.startswith("fedbench-study "):
            assert line.startswith(NOT_HERE) or "fedbench-report" in line or "python -c" in line, line
            assert any(part in manual for part in (line, line.split()[0] + " " + line.split()[1])), line


@pytest.mark.parametrize("line", [c for c in commands() if fedbench_args(c) is not None])
def test_readme_command_runs_as_written(line, tmp_path, monkeypatch, capsys):
    args = fedbench_args(line)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):  # --cfg job: Hydra prints
        monkeypatch.setattr(sys, "argv", ["fedbench", *args])
        try:
            cli.main()
        except SystemExit as stop:
            assert stop.code in (0, None)
        assert "rounds:" in capsys.readouterr().out
        return
    needed = next((msg for key, msg in NEEDS.items() if key in args), None)
    if "hydra/launcher=slurm" in args and needed is None:
        from test_slurm import _reason

        if _reason is not None:
            pytest.skip(_reason)
    error = cli.check_group_overrides(args) or cli.missing_sweeper(args) or cli.preflight(args)
    if needed is None:
        assert error is None, f"{line}\n  -> {error}"
    else:
        assert error is not None and needed in error, f"{line}\n  -> {error}"


@pytest.mark.parametrize("line", [c for c in commands() if c.startswith("fedbench-study ")])
def test_readme_study_command_passes_the_study_checks(line, tmp_path, monkeypatch):
    """A `fedbench-study` line: its study file with its changes parses, and a run of every method x
    setting at both ends of each search space passes the pre-flight (what the command checks first)."""
    from fedbench.study import check_runs
    from fedbench.study.spec import load_study

    words = shlex.split(line)[1:]
    if "--dir" in words:
        del words[words.index("--dir"):words.index("--dir") + 2]
    monkeypatch.chdir(tmp_path)
    check_runs(load_study(words[0], words[1:]))
