"""Test helpers: a shard's raw samples, the column batch the pipeline's transform takes, and
single-process training on them (the package's own Ray-free helpers, under the tests' names)."""

from __future__ import annotations

from jepa_ray.stream.local import raw_batch, read_samples
from jepa_ray.train.local import train_on_samples

raw_samples = read_samples
train_in_memory = train_on_samples

__all__ = ["raw_batch", "raw_samples", "train_in_memory"]
