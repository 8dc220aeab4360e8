"""One writer per run dir: an advisory lock held while a run writes there."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedbench.errors import RunDirBusy


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir/.fedbench.lock`; a second run into the same dir stops with one line (RunDirBusy)
    before it writes anything."""
    f = open(run_dir / ".fedbench.lock", "a+")  # held (open) for the whole run
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise RunDirBusy(f"run dir {run_dir} is in use by another fedbench run ({owner}); wait for it to "
                             f"end or choose another hydra.run.dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock
