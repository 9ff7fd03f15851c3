"""The Ray side of `prepare`: header-scan tasks and shard-writing tasks with bounded concurrency."""

from __future__ import annotations

from collections import deque
from typing import Any

from jepa_ray.config import PrepareConfig
from jepa_ray.data.shards import SampleSpec, decode_images, write_shard


def scan_headers(paths: list[str]) -> list[Any]:
    """Read the headers of some files: a DicomHeader or a quarantine record per path."""
    from jepa_ray.data.dicom import read_header
    from jepa_ray.errors import InvalidDicomError

    out: list[Any] = []
    for p in paths:
        try:
            out.append(read_header(p))
        except InvalidDicomError as e:
            out.append({"path": p, "reason": e.reason, "detail": e.detail})
    return out


class TaskMap:
    """`fn(chunk)` for every chunk as Ray tasks with bounded concurrency.

    The first tasks are submitted on construction, so the caller can do driver-side work while
    they run, then collect with `results()` (in chunk order).
    """

    def __init__(
        self, fn, chunks: list[Any], desc: str, show_progress: bool, max_in_flight: int = 64
    ) -> None:
        import ray

        self._remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        self._chunks, self._desc, self._show = chunks, desc, show_progress
        self._it = iter(enumerate(chunks))
        self._pending: dict[Any, int] = {}
        for i, chunk in self._it:
            self._pending[self._remote.remote(chunk)] = i
            if len(self._pending) >= max_in_flight:
                break

    def results(self) -> list[Any]:
        import ray

        results: list[Any] = [None] * len(self._chunks)
        with progress(self._desc, len(self._chunks), self._show) as advance:
            while self._pending:
                done, _ = ray.wait(list(self._pending), num_returns=1)
                i = self._pending.pop(done[0])
                results[i] = ray.get(done[0])
                advance()
                nxt = next(self._it, None)
                if nxt is not None:
                    self._pending[self._remote.remote(nxt[1])] = nxt[0]
        return results


class progress:
    """A rich progress bar when wanted, a no-op otherwise."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.desc, self.total, self.enabled = desc, total, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._p = Progress(transient=False)
        self._p.start()
        task = self._p.add_task(self.desc, total=self.total)
        return lambda: self._p.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.stop()


def write_shards(
    todo: list[tuple[str, str, str, list[SampleSpec]]],
    cfg: PrepareConfig,
    out: str,
    records: dict[str, dict[str, Any]],
    show_progress: bool,
) -> list[tuple[str, str]]:
    """Decode and write the shards still to do; returns (shard, error) for those that failed."""
    import ray

    decode = ray.remote(num_cpus=1, max_retries=2)(decode_images)
    # a whole CPU: writers then reuse the decode workers instead of starting (and importing into)
    # extra worker processes that would compete with decoding
    write = ray.remote(num_cpus=1, max_retries=2)(_write_from_chunks)
    # enough shards in flight to keep every CPU of the cluster busy, few enough to bound memory
    max_shards = max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
    failures: list[tuple[str, str]] = []
    pending: dict[Any, str] = {}
    queue = deque(todo)
    step = cfg.files_per_task
    with progress("write shards", len(todo), show_progress) as advance:
        while queue or pending:
            while queue and len(pending) < max_shards:
                name, split, fp, specs = queue.popleft()
                # decode tasks get only the paths; the EHR arrays and metadata go to the writer alone
                chunks = [specs[i : i + step] for i in range(0, len(specs), step)]
                refs = [
                    decode.remote([s.dicoms for s in c], cfg.image, cfg.volume, [s.kind for s in c])
                    for c in chunks
                ]
                pending[write.remote(name, split, fp, specs, out, cfg.storage, *refs)] = name
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            try:
                records[name] = ray.get(done[0])
            except Exception as e:  # a task that failed after its retries: report it, keep the rest
                cause = getattr(e, "cause", None) or e
                failures.append((name, f"{type(cause).__name__}: {cause}"[:300]))
            advance()
    return failures


def _write_from_chunks(name, split, fp, specs, out, storage, *chunks):
    decoded = [d for chunk in chunks for d in chunk]
    return write_shard(name, split, fp, specs, decoded, out, storage)
