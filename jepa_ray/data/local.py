"""Shards without Ray: a local shard's raw samples, the pipeline's batches built from them, and a
single-process training loop over them (notebooks, tests, quick experiments on one CPU)."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, BinaryIO

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


def train_on_samples(
    model: Any,
    samples: dict[str, dict[str, bytes]],
    spec: Any,
    cfg: Any,
    steps: int,
    lr: float = 1e-3,
    batch: int = 16,
    seed: int = 0,
    ema: tuple[float, float] | None = None,
) -> list[float]:
    """Train a `JEPA` single-process on in-memory raw samples with the pipeline's transform (training
    augmentation and masks) and `jepa_ray.model.optim.train_step`; returns the per-step losses.

    `spec` is the shards' FeatureSpec (`open_split(...).spec`), `cfg` a PipelineConfig; `ema` is
    the momentum schedule (start, end), as `model.ema` sets it for `pretrain` (None: the model's own,
    `jepa_ray.model.jepa.target_ema`).
    """
    from jepa_ray.data.pipeline import collate
    from jepa_ray.data.transform import transform_batch
    from jepa_ray.model.jepa import target_ema
    from jepa_ray.model.optim import Schedule, make_optimizer, train_step

    keys = list(samples)
    ema = target_ema(model.cfg) if ema is None else tuple(ema)
    schedule = Schedule(total_steps=steps, lr=lr, warmup_steps=max(steps // 10, 1), ema=ema)
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
