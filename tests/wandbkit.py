"""W&B offline runs read back: the records wandb wrote into `offline-run-*/run-<id>.wandb`, parsed
with wandb's own protobuf definitions (`wandb.proto.wandb_internal_pb2.Record`).

The file is W&B's append-only log: a 7-byte header (`:W&B`, a magic number, a version), then
32 KiB blocks of chunks, each a 4-byte checksum, a 2-byte length and a 1-byte type (full, first,
middle, last) before its bytes; a record is one full chunk or first + middle... + last. A block's
last < 7 bytes are padding."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(data: bytes):
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B", data[:8]
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + n]
        pos += HEADER + n
        if kind == 0:  # zero fill
            continue
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


@dataclass
class OfflineRun:
    """What one offline run file holds."""

    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # each: {"_step": n, metric: value, ...}
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)  # each: {"name", "type", "files"}
    files: list[str] = field(default_factory=list)  # run files (under the run folder's files/)
    exit_code: int | None = None


def read_run(data: bytes) -> OfflineRun:
    run = OfflineRun()
    for r in records(data):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.name = r.run.run_id, r.run.project, r.run.display_name
            run.group, run.job_type = r.run.run_group, r.run.job_type
            run.config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            run.config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            run.history.append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            )
        elif kind == "summary":
            for u in r.summary.update:
                run.summary["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
        elif kind == "artifact":
            files = sorted(c.path for c in r.artifact.manifest.contents)
            run.artifacts.append({"name": r.artifact.name, "type": r.artifact.type, "files": files})
        elif kind == "files":
            run.files += [f.path for f in r.files.files]
        elif kind == "exit":
            run.exit_code = r.exit.exit_code
    return run


def offline_runs(fs, root: str) -> list[OfflineRun]:
    """Every offline run file under `root` (a local dir with fs=None, or a path on an fsspec
    filesystem), oldest first."""
    if fs is None:
        from pathlib import Path

        paths = sorted(str(p) for p in Path(root).glob("wandb/offline-run-*/run-*.wandb"))
        return [read_run(Path(p).read_bytes()) for p in paths]
    return [read_run(fs.cat(p)) for p in sorted(fs.glob(f"{root}/wandb/offline-run-*/run-*.wandb"))]
