"""Read an offline wandb run back from its files (the .wandb transaction log and media), without a server."""

import glob
import json
import struct
from pathlib import Path

_HEADER, _BLOCK = 7, 32768  # W&B header, then LevelDB-log blocks of records (crc u32, length u16, type u8)


def _records(path: str):
    data = Path(path).read_bytes()
    pos, partial = _HEADER, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            yield partial + chunk


def offline_run(wandb_dir) -> dict:
    """{"history": [row dicts], "config": {...}, "dir": run folder} of the one offline run under ``wandb_dir``."""
    from wandb.proto import wandb_internal_pb2 as pb
    (run_file,) = glob.glob(f"{wandb_dir}/wandb/offline-run-*/run-*.wandb")
    history, config = [], {}
    for raw in _records(run_file):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind in ("config", "run"):
            items = rec.config.update if kind == "config" else rec.run.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return {"history": history, "config": config, "dir": Path(run_file).parent}
