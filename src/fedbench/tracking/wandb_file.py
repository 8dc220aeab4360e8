"""Read back an offline W&B run file (`run-*.wandb`) without a server.

The file is a LevelDB-style record log: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
records with a 7-byte header (crc32, length uint16, type: 1 full, 2 first, 3 middle, 4 last) and a
protobuf `Record` payload.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def iter_records(path: str | Path):
    """Yield the file's protobuf records; stops at a torn tail (a chunk still being written)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += room  # zero padding to the end of a block
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != _crc:
            return  # the writer has not flushed this chunk yet
        pos += HEADER + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            payload = pending + chunk
            pending = b""
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def is_complete(path: str | Path) -> bool:
    """True once the run's last record is its `exit` record (W&B writes it last, at finish)."""
    last = None
    try:
        for rec in iter_records(path):
            last = rec.WhichOneof("record_type")
    except (OSError, ValueError):
        return False
    return last == "exit"


def wait_complete(path: str | Path, timeout: float = 60.0) -> bool:
    """Wait until the W&B service has flushed the whole run file.

    `run.finish()` can return while the service still buffers the file's last block (seen under CPU
    load), so a reader right after finish would miss rows.
    """
    deadline = time.monotonic() + timeout
    while True:
        if Path(path).exists() and is_complete(path):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _items(items) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_run(path: str | Path) -> dict[str, Any]:
    """{'history': [row, ...], 'summary': {...}, 'config': {...}, 'group': str, 'tags': [...]}."""
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(rec.history.item))
        elif kind == "summary":
            summary.update(_items(rec.summary.update))
        elif kind == "config":
            config.update(_items(rec.config.update))
        elif kind == "run":
            config.update(_items(rec.run.config.update))
            meta = {"group": rec.run.run_group, "tags": list(rec.run.tags), "job_type": rec.run.job_type,
                    "run_id": rec.run.run_id, "project": rec.run.project}
    return {"history": history, "summary": summary, "config": config, **meta}
