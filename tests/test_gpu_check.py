"""scripts/gpu_check.sh, the one-shot device script a GPU owner runs, end to end in its quick CPU form
(kept out of tests/test_device.py, which the script itself runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """Every step passes in its quick CPU form and lands in one JSON."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out",
                          str(tmp_path / "results"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    report = json.loads(next((tmp_path / "results").glob("gpu_check-cpu-*.json")).read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert all(s["ok"] for s in steps.values())
    assert {"device tests", "fedbench-bench", "peer benchmark"} <= set(steps)
    for method in ("fedsq", "deepafl", "flops", "flops_pa", "fedpac", "fedecouple"):
        assert steps[f"run {method}"]["summary"]["status"] == "completed"
    assert steps["run fedavg_2_ranks"]["summary"]["executor"].endswith("x2 workers")
    assert list((tmp_path / "results").glob("cpu-*.json"))  # fedbench-bench's own JSON
