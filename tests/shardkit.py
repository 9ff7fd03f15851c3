"""Test helpers: a shard's raw samples, and the column batch the pipeline's transform takes."""

from __future__ import annotations

import tarfile

import numpy as np


def raw_samples(path) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} of one shard, as the reader sees it."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, rest = m.name.partition(".")
            out.setdefault(key, {})[rest.split(".")[0]] = tar.extractfile(m).read()
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
