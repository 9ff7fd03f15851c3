"""Reading shards with Ray Data: a webdataset reader that survives damaged tars, and its ledger.

Why not `ray.data.read_webdataset`: on a truncated tar it fails the read task and loses the
samples it had already parsed (up to 511), and with `max_errored_blocks` the damage vanishes
uncounted; a tar whose header is corrupt mid-file simply ends early (Python's `tarfile` stops at
a bad header), so the loss is silent. This reader parses the same webdataset layout (a sample's
files adjacent, `<key>.<field>`), keeps every complete sample before the damage, checks the count
against the manifest, and reports what is lost to a `SkipLedger`, which fails the epoch once more
than `pipeline.max_bad_samples` are gone.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar

from ray.data.datasource import FileBasedDatasource

from jepa_ray.errors import ShardError

logger = logging.getLogger(__name__)

FIELDS = ("image", "ehr", "meta")  # <key>.image.npy, <key>.ehr.npz, <key>.meta.json


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


class ShardDatasource(FileBasedDatasource):
    """webdataset tars to blocks of raw samples: key, shard, image, ehr, meta (bytes or null)."""

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["tar"]

    def __init__(
        self,
        paths: list[str],
        *,
        expected: dict[str, int],
        ledger: Any,
        limit: int,
        rows_per_block: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(paths, **kwargs)
        self.expected, self.ledger, self.limit = expected, ledger, limit
        self.rows_per_block = rows_per_block

    def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
        shard = posixpath.basename(path)

        def damaged(where: str, reason: str, lost: int) -> None:
            report_bad(self.ledger, self.limit, shard, where, reason, lost)

        rows: list[dict[str, Any]] = []
        for sample in tar_samples(f, shard, self.expected.get(shard), damaged):
            rows.append(sample)
            if len(rows) >= self.rows_per_block:
                yield raw_block(rows)
                rows = []
        if rows:
            yield raw_block(rows)


def raw_block(rows: list[dict[str, Any]], extra: dict[str, list] | None = None):
    """A pyarrow table of raw samples (key, shard: strings; image, ehr, meta: bytes or null), with
    `extra` columns as given."""
    import pyarrow as pa

    cols = {"key": pa.array([r["key"] for r in rows], pa.string())}
    cols["shard"] = pa.array([r["shard"] for r in rows], pa.string())
    for k in FIELDS:
        cols[k] = pa.array([r.get(k) for r in rows], pa.binary())
    for k, v in (extra or {}).items():
        cols[k] = pa.array(v)
    return pa.table(cols)


def tar_samples(
    f: Any, shard: str, expected: int | None, damaged, fields: tuple[str, ...] = FIELDS
) -> Iterator[dict[str, Any]]:
    """The complete samples of one webdataset tar, in order: {"key", "shard", <field>: bytes} for
    the `fields` asked for (training's: image, ehr, meta).

    Damage (a cut file, a corrupt header, fewer samples than the manifest's `expected`) ends the
    stream after the last complete sample and is reported once as `damaged(where, reason, lost)`."""
    read = 0
    current: dict[str, Any] | None = None
    problem = None
    last = ""  # key of the last complete sample
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, _, rest = posixpath.basename(info.name).partition(".")
                field = rest.split(".", 1)[0]
                data = tar.extractfile(info).read()
                if current is None or key != current["key"]:
                    if current is not None:
                        read += 1
                        last = current["key"]
                        yield current
                    current = {"key": key, "shard": shard}
                if field in fields:
                    current[field] = data
    except (tarfile.TarError, EOFError, zlib.error) as e:
        problem = f"the tar is damaged ({type(e).__name__}: {e})"
        current = None  # the sample being read when the damage hit may be incomplete
    if current is not None:
        read += 1
        last = current["key"]
        yield current
    if problem is None and expected is not None and read < expected:
        problem = "the tar ends early (a corrupt header or a cut file)"
    if problem is not None:
        lost = expected - read if expected is not None else 1
        if lost <= 0:  # e.g. only the end-of-archive padding is cut: every sample is there
            logger.warning("shard %s: %s, but all %d samples were read", shard, problem, read)
            return
        where = f"after sample {last}" if last else "at its start"
        of = f" of {expected}" if expected is not None else ""
        damaged(where, f"{problem}: {lost}{of} samples lost", lost)
