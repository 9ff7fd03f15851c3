"""Reading shards with Ray Data: a webdataset reader that survives damaged tars.

Why not `ray.data.read_webdataset`: on a truncated tar it fails the read task and loses the
samples it had already parsed (up to 511), and with `max_errored_blocks` the damage vanishes
uncounted; a tar whose header is corrupt mid-file simply ends early (Python's `tarfile` stops at
a bad header), so the loss is silent. This reader parses the same webdataset layout (a sample's
files adjacent, `<key>.<field>`), keeps every complete sample before the damage, checks the count
against the manifest, and reports what is lost to a `SkipLedger` (`jepa_ray.stream.ledger`), which
fails the epoch once more than `pipeline.max_bad_samples` are gone.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar

from ray.data.datasource import FileBasedDatasource

from jepa_ray.stream.ledger import report_bad

logger = logging.getLogger(__name__)

FIELDS = ("image", "ehr", "meta")  # <key>.image.npy, <key>.ehr.npz, <key>.meta.json


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
