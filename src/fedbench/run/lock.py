"""One writer per run dir (and per sweep dir): an advisory lock held while a process writes there.

The CLI takes the lock before Hydra writes anything (`fedbench.run.ownership`) and holds it for the
process; `run_dir_lock` inside the run is then a no-op re-entry. A second process into the same dir is
refused before it touches a byte."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from fedbench.errors import RunDirBusy

RUN_LOCK = ".fedbench.lock"
SWEEP_LOCK = ".fedbench-sweep.lock"
_HELD: dict[Path, IO[str]] = {}  # locks this process holds until it exits


def _key(path: Path) -> Path:
    return path.resolve()


def owner_of(lock_file: Path) -> str | None:
    """Who holds `lock_file` (its 'pid N on HOST' line), or None when nobody does. Reads only."""
    if not lock_file.exists() or _key(lock_file.parent) in _HELD:
        return None
    with open(lock_file) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
    return None


def acquire(directory: Path, name: str = RUN_LOCK) -> IO[str] | None:
    """Take `directory/name` without writing to it: the open file holding the lock, or None when another
    process holds it. The directory is created if needed."""
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / name, "a+")  # noqa: SIM115 - held (open) as long as the lock is
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def sign(f: IO[str]) -> None:
    """Write this process into a lock it holds (who holds it, for the message a second process gets)."""
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()


def hold(directory: Path, f: IO[str]) -> None:
    """Keep the lock `f` on `directory` until this process exits."""
    sign(f)
    _HELD[_key(directory)] = f


def busy_error(directory: Path, owner: str, key: str, what: str = "run") -> RunDirBusy:
    return RunDirBusy(f"{key}={directory} is in use by another fedbench {what} ({owner}); wait for it to end "
                      f"or choose another {key}")


@contextmanager
def run_dir_lock(run_dir: Path, key: str = "hydra.run.dir") -> Iterator[None]:
    """Hold `run_dir/.fedbench.lock` while a run writes there; a second run into the same dir stops with
    one line (RunDirBusy) before it writes anything. Re-entering a lock this process holds is a no-op."""
    if _key(run_dir) in _HELD:
        yield
        return
    f = acquire(run_dir)
    if f is None:
        raise busy_error(run_dir, owner_of(run_dir / RUN_LOCK) or "another process", key) from None
    try:
        sign(f)
        yield
    finally:
        f.close()  # closing releases the lock
