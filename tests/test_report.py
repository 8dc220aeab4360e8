"""The report command on a small real sweep: row count and means checked against the per-run
summaries; the PNGs exist."""

import json

import pandas as pd
import pytest

from conftest import TINY, run_cli
from fedbench.report import report


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["--multirun", *TINY, "rounds=3", "method=fedavg,fedprox", "partition.alpha=0.1,1.0", "seed=0,1",
                    f"hydra.sweep.dir={root / 's'}"], root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "s"


def test_report_rows_and_means(sweep, tmp_path):
    res = report(sweep, tmp_path / "out")
    runs, agg = res["runs"], res["summary"]
    assert len(runs) == 8
    assert len(agg) == 4 and set(agg["seeds"]) == {2}  # 2 methods x 2 alphas, 2 seeds each
    assert {"method", "partition.alpha"} <= set(agg.columns)
    summaries = [json.loads(p.read_text()) | {"dir": p.parent} for p in sweep.glob("*/summary.json")]
    for _, row in agg.iterrows():
        members = []
        for s in summaries:
            ov = (s["dir"] / ".hydra" / "overrides.yaml").read_text()
            if f"method={row['method']}" in ov and f"partition.alpha={row['partition.alpha']}" in ov:
                members.append(s)
        assert len(members) == 2
        for key in ("best/val_acc", "best/round", "comm/bytes_total"):
            expected = pd.Series([m[key] for m in members])
            assert row[f"{key} mean"] == pytest.approx(expected.mean())
            assert row[f"{key} std"] == pytest.approx(expected.std())
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.count("\n") == 2 + 4 and "±" in md
    assert (tmp_path / "out" / "report.csv").exists() and (tmp_path / "out" / "summary.csv").exists()
    names = {p.name for p in res["plots"]}
    assert {"val_vs_round.png", "val_vs_bytes.png", "rounds_to_best_vs_alpha.png"} <= names
    assert "personal_val_vs_round.png" not in names  # no personalized method, no noniid_s split
    for p in res["plots"]:
        assert p.stat().st_size > 5000


def test_report_cli(sweep, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fedbench.report", str(sweep), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "8 runs" in proc.stdout and (tmp_path / "r" / "summary.md").exists()
