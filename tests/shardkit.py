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


def train_in_memory(
    model, samples: dict, spec, cfg, steps: int, lr: float = 1e-3, batch: int = 16, seed: int = 0
):
    """Train `model` single-process on in-memory raw samples (no Ray): the per-step losses."""
    from jepa_ray.data.pipeline import collate
    from jepa_ray.data.transform import transform_batch
    from jepa_ray.model.optim import Schedule, make_optimizer, train_step

    keys = list(samples)
    schedule = Schedule(total_steps=steps, lr=lr, warmup_steps=max(steps // 10, 1))
    optimizer = make_optimizer(model, schedule)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        chosen = rng.choice(len(keys), min(batch, len(keys)), replace=False)
        raw = raw_batch({keys[i]: samples[keys[i]] for i in chosen})
        metrics = train_step(
            model, optimizer, collate(transform_batch(raw, spec, cfg, train=True, epoch=step)), step, schedule
        )
        losses.append(metrics["loss"])
    return losses
