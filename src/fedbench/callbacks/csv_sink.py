"""A CSV sink: metrics.csv in the run dir, one row per round, a column per metric.

    fedbench logger=csv                      # or: logger.sinks=[wandb,csv]

A metric that first appears in a later round (evaluation every k rounds) widens the header: the file
is rewritten once with the new column. On resume the rows past the checkpoint are dropped, as in
metrics.jsonl.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbench.metrics import names
from fedbench.run.callbacks import Callback, callback

if TYPE_CHECKING:
    from fedbench.run.build import Run
    from fedbench.run.state import RunState


@callback("csv")
class CsvSink(Callback):
    stage = "sink"

    def on_start(self, run: Run, state: RunState) -> None:
        self.path: Path = run.run_dir / "metrics.csv"
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        if state.round > 0 and self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [
                    r for r in reader if r.get(names.ROUND) and int(r[names.ROUND]) <= state.round
                ]
        self.rewrite()

    def rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def after_round(
        self, run: Run, state: RunState, row: Mapping[str, Any]
    ) -> tuple[bool, dict[str, Any]]:
        values = {k: "" if v is None else v for k, v in row.items()}
        self.rows.append(values)
        new = [k for k in values if k not in self.columns]
        if new:  # the header grows: write the whole file again (once per new metric)
            self.columns += new
            self.rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(values)
        return False, {}
