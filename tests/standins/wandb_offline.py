"""What wandb wrote in offline mode, read back: its transaction log (`run-ID.wandb`) as protobuf records."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """wandb's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB's log format (32 KiB
    blocks of chunks, each with a CRC-32 over its type and data); each record a wandb_internal_pb2.Record. wandb
    0.31 has no Python reader of its own (syncing is wandb-core's, in Go)."""
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0) or pos + 7 + length > len(data):  # the end, or a chunk still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at byte {pos} of {path}"
        pos += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@dataclasses.dataclass
class OfflineRun:
    directory: Path
    records: list[Any]

    def only(self, kind: str) -> list[Any]:
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def run(self) -> Any:
        return self.only("run")[0]

    def config(self) -> dict[str, Any]:
        return {u.key: json.loads(u.value_json) for u in self.run.config.update if u.key != "_wandb"}

    def history(self) -> dict[int, dict[str, Any]]:
        """step -> {key: value} of the logged rows (wandb's own _timestamp/_runtime/_step left out)."""
        rows: dict[int, dict[str, Any]] = {}
        for h in self.only("history"):
            row = rows.setdefault(h.step.num, {})
            for item in h.item:
                key = item.key or item.nested_key[0]
                if key.startswith("_"):
                    continue
                if len(item.nested_key) > 1:  # a media value (a table) is a nested dict
                    row.setdefault(key, {})[item.nested_key[1]] = json.loads(item.value_json)
                else:
                    row[key] = json.loads(item.value_json)
        return rows


def offline_run(wandb_dir: Path, run_id: str, timeout: float = 30) -> OfflineRun:
    """The offline run `run_id` under WANDB_DIR, once wandb-core has written all of it (its exit record): finish()
    may return before its writer has flushed the log."""
    (directory,) = (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}")
    deadline = time.monotonic() + timeout
    while True:
        run = OfflineRun(directory, read_records(directory / f"run-{run_id}.wandb"))
        if run.only("exit"):
            return run
        assert time.monotonic() < deadline, f"no exit record in {directory} after {timeout} s"
        time.sleep(0.05)
