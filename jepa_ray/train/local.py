"""A single-process training loop over a local shard's raw samples, with the pipeline's transform
(notebooks, tests, quick experiments on one CPU)."""

from __future__ import annotations

from typing import Any

import numpy as np


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
    from jepa_ray.model.jepa import target_ema
    from jepa_ray.model.optim import Schedule, make_optimizer, train_step
    from jepa_ray.stream.local import raw_batch
    from jepa_ray.stream.pipeline import collate
    from jepa_ray.stream.transform import transform_batch

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
