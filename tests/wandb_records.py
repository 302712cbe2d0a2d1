"""A small reader for W&B's offline run files (run-*.wandb), to check what an offline run really
recorded.

Format (W&B's LevelDB-style log): a 7-byte file header (b":W&B", 2-byte magic, 1-byte version), then
32 KiB
blocks of chunks; each chunk has a 7-byte header (CRC-32 of type byte + payload, 4 bytes,
little-endian length
2 bytes, type 1 byte: FULL=1, FIRST=2, MIDDLE=3, LAST=4) and its payload; a block tail shorter than
7 bytes is
zero padding. Joined payloads are serialized wandb.proto.wandb_internal_pb2.Record messages.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"not a W&B run file: {data[:4]!r}"
    pos, records, parts = HEADER, [], []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # padding at the block's end
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zeroed tail (preallocated or padding)
            pos += left_in_block
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        if (
            zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != _crc
        ):  # CRC-32 over type byte + payload
            raise ValueError(
                f"{path}: chunk at byte {pos} fails its checksum (torn or foreign file)"
            )
        pos += HEADER + length
        if kind == FULL:
            parts = [payload]
        elif kind == FIRST:
            parts = [payload]
            continue
        elif kind == MIDDLE:
            parts.append(payload)
            continue
        elif kind == LAST:
            parts.append(payload)
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(b"".join(parts))
        records.append(rec)
    return records


def read_finished(path: Path, timeout: float = 30.0) -> list:
    """Records of a finished run. wandb-core may still be flushing the file for a moment after
    finish()
    returns (seen here: an all-zero file right after finish), so wait for the exit record."""
    import time

    deadline = time.time() + timeout
    while True:
        try:
            records = read_records(path)
        except ValueError:  # a chunk being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def summarize_records(records: list) -> dict:
    """Config, history rows and summary items of a run file, JSON-decoded."""
    config, history, summary, run = {}, [], {}, None
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
            for item in rec.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            history.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "summary":
            for item in rec.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"run": run, "config": config, "history": history, "summary": summary}
