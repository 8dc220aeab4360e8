"""metrics.jsonl (one row per round) and summary.json in the run dir."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from fedbench.errors import ConfigError

log = logging.getLogger("fedbench")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Atomically (a reader never sees half a file); `indent=None`: compact (long index lists)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class MetricsFile:
    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, round_: int) -> None:
        """On resume, drop rows past the checkpoint's round so the file matches an unbroken run."""
        if not self.path.exists():
            return
        rows = [r for r in self.read() if r.get("round", 0) <= round_]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        os.replace(tmp, self.path)  # a kill while rewriting never loses the rows

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}, sort_keys=True) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        """The rows; a torn LAST line (the process was killed while writing it) is dropped with a warning,
        a corrupt line elsewhere is one line naming it."""
        return read_rows(self.path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (see MetricsFile.read)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                log.warning("%s: its last line is torn (a process killed while writing it); dropped", path)
                continue
            raise ConfigError(f"{path}: line {i + 1} is not a JSON row; repair or delete that line "
                              f"(resume=false starts the run over)") from None
    return rows
