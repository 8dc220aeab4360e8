"""A callback outside fedbench, named by `callbacks.NAME._target_` (tests/test_callbacks.py)."""

import json

from fedbench.run.callbacks import Callback


class RoundSquare(Callback):
    """Adds mine/round_sq = round^2 + offset to every row; on_end writes how the run ended."""

    name = "mine"

    def __init__(self, offset: int = 0):
        super().__init__()
        self.offset = offset

    def after_round(self, run, state, row):
        return False, {"mine/round_sq": state.round**2 + self.offset, "mine/ended": None}

    def on_end(self, run, state, summary, end):
        (run.run_dir / "ended.json").write_text(
            json.dumps({"status": end.status, "stopped_by": end.stopped_by})
        )
