"""Shards without Ray: a local shard's raw samples and the reader's columns built from them
(notebooks, tests, quick experiments on one CPU; `jepa_ray.train.local` trains on them)."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np


def read_samples(
    path: str | Path | BinaryIO, fields: tuple[str, ...] | None = None
) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} of one shard, as the Ray Data reader sees it: a local path, or an open
    binary file (read as a stream, e.g. from S3); `fields` keeps only those (e.g. ("meta",))."""
    out: dict[str, dict[str, bytes]] = {}
    opened = {"name": path} if isinstance(path, str | Path) else {"fileobj": path, "mode": "r|"}
    with tarfile.open(**opened) as tar:
        for m in tar:
            key, _, rest = m.name.partition(".")
            field = rest.split(".")[0]
            if fields is None or field in fields:
                out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


def raw_batch(samples: dict[str, dict[str, bytes]], shard: str = "train-000000.tar") -> dict[str, np.ndarray]:
    """The reader's columns (key, shard, image, ehr, meta) for these samples."""
    keys = list(samples)

    def col(field: str) -> np.ndarray:
        return np.array([samples[k].get(field) for k in keys], dtype=object)

    return {
        "key": np.array(keys, dtype=object),
        "shard": np.array([shard] * len(keys), dtype=object),
        "image": col("image"),
        "ehr": col("ehr"),
        "meta": col("meta"),
    }
