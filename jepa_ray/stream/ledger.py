"""The skip ledger: the samples a run's data lost as damaged, per epoch, and the limit past which
an epoch fails (`pipeline.max_bad_samples`).

A module of its own, importing neither Ray Data nor torch: each run's `SkipLedger` actor is a
process that imports only this (Ray Data's import alone is ~1.3 s of a worker's start on a CPU).
"""

from __future__ import annotations

import logging
from typing import Any

from jepa_ray.errors import ShardError

logger = logging.getLogger("jepa_ray.stream.reader")  # the reader's losses: the name they always had


def current_epoch() -> int:
    """The index of the running execution of the dataset: 0 for the first epoch, then 1, 2, ...

    The same counter drives Ray Data's per-epoch file shuffle (`FileShuffleConfig`), so crops and
    masks change from epoch to epoch in step with the file order.
    """
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


class SkipLedger:
    """Samples skipped per epoch (a Ray actor); `record` fails once the epoch's total passes the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.records: dict[int, dict[tuple[str, str], dict[str, Any]]] = {}

    def record(self, epoch: int, shard: str, key: str, reason: str, lost: int = 1) -> int:
        """Note a loss (idempotent per shard and key, so retried tasks do not count twice); the total."""
        self.records.setdefault(epoch, {})[(shard, key)] = {
            "shard": shard,
            "key": key,
            "reason": reason,
            "lost": lost,
        }
        return self.total(epoch)

    def total(self, epoch: int) -> int:
        return sum(r["lost"] for r in self.records.get(epoch, {}).values())

    def summary(self, epoch: int | None = None) -> dict[str, Any]:
        """{"skipped": n, "records": [...]} for one epoch, or per epoch when `epoch` is None."""
        if epoch is None:
            return {e: self.summary(e) for e in sorted(self.records)}
        return {"skipped": self.total(epoch), "records": list(self.records.get(epoch, {}).values())}


def report_bad(
    ledger: Any, limit: int, shard: str, key: str, reason: str, lost: int = 1, epoch: int | None = None
) -> None:
    """Log a skipped sample (or tail of a shard), count it in `epoch` (default: the running
    execution's), and fail once the epoch's count passes the limit."""
    import ray

    epoch = current_epoch() if epoch is None else epoch
    logger.warning("epoch %d: skipped %d sample(s) of shard %s at %s: %s", epoch, lost, shard, key, reason)
    total = ray.get(ledger.record.remote(epoch, shard, key, reason, lost)) if ledger is not None else lost
    if total > limit:
        raise ShardError(
            f"epoch {epoch}: {total} samples skipped, more than pipeline.max_bad_samples={limit}; "
            f"the last: shard {shard}, {key}: {reason}. Check the shards with `jepa-ray inspect --verify`."
        )
