"""metrics.jsonl (one row per round) and summary.json in the run dir."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class MetricsFile:
    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, round_: int) -> None:
        """On resume, drop rows past the checkpoint's round so the file matches an unbroken run."""
        if not self.path.exists():
            return
        rows = [r for r in self.read() if r.get("round", 0) <= round_]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}, sort_keys=True) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
