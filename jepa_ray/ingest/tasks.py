"""The Ray side of `prepare`: header-scan tasks and shard-writing tasks with bounded concurrency.

No input can take the run down: an exception inside a task becomes a quarantine record, and a task
whose worker dies (a decoder that crashes the process, the memory monitor killing it) is retried
input by input, so only the inputs that kill a worker on their own are quarantined
(`worker_crashed`), and every other input of the chunk is still read. A task lost with its node (a
preempted or failed machine) is Ray's to retry and then run again here; it never quarantines the
inputs it was reading.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from jepa_ray.config import LimitsConfig, PrepareConfig
from jepa_ray.ingest.quarantine import dicom_record, error_type, unexpected_error, worker_crashed
from jepa_ray.ingest.write import SampleSpec, decode_images, no_image, write_shard

logger = logging.getLogger(__name__)


def scan_headers(paths: list[str], limits: LimitsConfig | None = None) -> list[Any]:
    """Read the headers of some files: a DicomHeader, or a quarantine record whose `input` is the
    file's path, per path."""
    from jepa_ray.errors import InvalidDicomError
    from jepa_ray.ingest.header import read_header

    out: list[Any] = []
    for p in paths:
        try:
            out.append(read_header(p, limits))
        except InvalidDicomError as e:
            out.append(dicom_record(p, e.reason, e.detail))
        except Exception as e:  # a bug or an input no check foresaw: this file only, by type only
            out.append(unexpected_error(p, e, "the header"))
    return out


def crashed_scan(path: str, error: BaseException) -> dict[str, Any]:
    """The quarantine record of a file whose header scan killed its worker, even alone."""
    return worker_crashed(path, error, "reading its header", "read")


class TaskMap:
    """`fn(chunk, *args)` for every chunk (a list of inputs) as Ray tasks with bounded concurrency.

    The first tasks are submitted on construction, so the caller can do driver-side work while
    they run, then collect with `results()` (in chunk order). A chunk whose task fails after Ray's
    retries is run again input by input; an input that fails alone becomes `on_failure(input,
    error)` in the results, and the others keep their real results.
    """

    def __init__(
        self,
        fn,
        chunks: list[list[Any]],
        desc: str,
        show_progress: bool,
        max_in_flight: int = 64,
        args: tuple = (),
        on_failure: Callable[[Any, BaseException], Any] | None = None,
    ) -> None:
        import ray

        self._remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        self._alone = ray.remote(num_cpus=1, max_retries=0)(fn)
        self._args, self._on_failure = args, on_failure
        self._chunks, self._desc, self._show = chunks, desc, show_progress
        self._it = iter(enumerate(chunks))
        self._pending: dict[Any, int] = {}
        for i, chunk in self._it:
            self._pending[self._remote.remote(chunk, *args)] = i
            if len(self._pending) >= max_in_flight:
                break

    def _one_by_one(self, chunk: list[Any], error: BaseException) -> list[Any]:
        if self._on_failure is None:
            raise error
        logger.warning(
            "%s: a task over %d inputs failed (%s); reading them one by one",
            self._desc,
            len(chunk),
            error_type(error),
        )
        return each_alone(lambda item: self._alone.remote([item], *self._args), chunk, self._on_failure)

    def results(self) -> list[Any]:
        import ray

        results: list[Any] = [None] * len(self._chunks)
        with progress(self._desc, len(self._chunks), self._show) as advance:
            while self._pending:
                done, _ = ray.wait(list(self._pending), num_returns=1)
                i = self._pending.pop(done[0])
                try:
                    results[i] = ray.get(done[0])
                except Exception as e:  # after Ray's retries: find the input(s) that cause it
                    results[i] = self._one_by_one(self._chunks[i], e)
                advance()
                nxt = next(self._it, None)
                if nxt is not None:
                    self._pending[self._remote.remote(nxt[1], *self._args)] = nxt[0]
        return results


class progress:
    """A phase's progress display when wanted (`jepa_ray.console.PhaseProgress`: a rich bar on a
    terminal, plain lines otherwise), a no-op otherwise."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.desc, self.total, self.enabled = desc, total, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from jepa_ray.console import PhaseProgress

        self._p = PhaseProgress(self.desc, self.total)
        return self._p.__enter__()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.__exit__(*exc)


def write_shards(
    todo: list[tuple[str, str, str, list[SampleSpec]]],
    cfg: PrepareConfig,
    out: str,
    records: dict[str, dict[str, Any]],
    show_progress: bool,
    decode: Callable[..., list[dict[str, Any]]] = decode_images,
    allowed_masks: set[str] | None = None,
) -> list[tuple[str, str]]:
    """Decode and write the shards still to do; returns (shard, error) for those that failed.

    A shard whose write fails is tried once more; any of its decoding tasks that failed (after Ray's
    retries) is first rerun sample by sample, and a sample that fails alone goes into the shard
    without its image, its files quarantined (`worker_crashed`)."""
    import ray

    decoder = ray.remote(num_cpus=1, max_retries=2)(decode)
    # a whole CPU: writers then reuse the decode workers instead of starting (and importing into)
    # extra worker processes that would compete with decoding
    write = ray.remote(num_cpus=1, max_retries=2)(_write_from_chunks)
    # enough shards in flight to keep every CPU of the cluster busy, few enough to bound memory
    max_shards = max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
    failures: list[tuple[str, str]] = []
    pending: dict[Any, tuple] = {}
    queue = deque(todo)
    step = cfg.files_per_task
    with progress("write shards", len(todo), show_progress) as advance:
        while queue or pending:
            while queue and len(pending) < max_shards:
                job = queue.popleft()
                name, split, fp, specs = job
                # decode tasks get only the paths; the EHR arrays and metadata go to the writer alone
                chunks = [specs[i : i + step] for i in range(0, len(specs), step)]
                refs = [_decode_remote(decoder, c, cfg, allowed_masks) for c in chunks]
                pending[write.remote(name, split, fp, specs, out, cfg.storage, *refs)] = (job, chunks, refs)
            done, _ = ray.wait(list(pending), num_returns=1)
            job, chunks, refs = pending.pop(done[0])
            name, split, fp, specs = job
            try:
                records[name] = ray.get(done[0])
            except Exception as e:  # after Ray's retries: redo what failed, input by input
                logger.warning(
                    "shard %s failed (%s); decoding its failed parts sample by sample", name, error_type(e)
                )
                try:
                    decoded = _decoded(chunks, refs, cfg, decode, allowed_masks)
                    records[name] = ray.get(write.remote(name, split, fp, specs, out, cfg.storage, decoded))
                except Exception as e2:  # the write itself fails: report it, keep the rest
                    cause = getattr(e2, "cause", None) or e2
                    failures.append((name, f"{type(cause).__name__}: {cause}"[:300]))
            advance()
    return failures


def _decode_remote(
    remote, specs: list[SampleSpec], cfg: PrepareConfig, allowed_masks: set[str] | None = None
):
    return remote.remote(
        [s.dicoms for s in specs],
        cfg.image,
        cfg.volume,
        [s.kind for s in specs],
        cfg.limits,
        [s.masks for s in specs],
        allowed_masks,
    )


def _decoded(
    chunks: list[list[SampleSpec]],
    refs: list,
    cfg: PrepareConfig,
    decode,
    allowed_masks: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Every sample's decoded image, from the chunk tasks that succeeded and, for those that failed,
    from one task per sample; a sample whose task fails alone has no image, its files quarantined."""
    import ray

    alone = ray.remote(num_cpus=1, max_retries=0)(decode)
    out: list[dict[str, Any]] = []
    for chunk, ref in zip(chunks, refs, strict=True):
        try:
            out.extend(ray.get(ref))
        except Exception:
            out.extend(
                each_alone(
                    lambda spec: _decode_remote(alone, [spec], cfg, allowed_masks), chunk, _crashed_sample
                )
            )
    return out


def _crashed_sample(spec: SampleSpec, error: BaseException) -> dict[str, Any]:
    """A sample whose decoding killed its worker, even alone: no image, its files quarantined."""
    return no_image(
        [worker_crashed(source, error, "decoding its study", "decoded") for _, source in spec.dicoms]
    )


def node_failure(error: BaseException) -> bool:
    """Whether a task failed because its node did (lost, preempted, its raylet dead, the node that
    held its input gone), not because of what it was reading."""
    from ray.exceptions import LocalRayletDiedError, NodeDiedError, ObjectLostError

    return isinstance(error, (NodeDiedError, LocalRayletDiedError, ObjectLostError))


def each_alone(
    submit: Callable[[Any], Any],
    items: list[Any],
    on_failure: Callable[[Any, BaseException], Any],
    node_retries: int = 3,
) -> list:
    """Every item's results from a task of its own (`submit(item)` returns its ref); an item whose
    task fails becomes `on_failure(item, error)`. A task lost with its node says nothing about its
    item: it is submitted again (up to `node_retries` times, then the error is raised), never
    recorded as the item's failure."""
    import ray

    refs = [submit(item) for item in items]
    out: list[Any] = []
    for item, ref in zip(items, refs, strict=True):
        for attempt in range(node_retries + 1):
            try:
                out.extend(ray.get(ref))
            except Exception as e:
                if node_failure(e) and attempt < node_retries:
                    logger.warning("a task was lost with its node (%s); running it again", error_type(e))
                    ref = submit(item)
                    continue
                if node_failure(e):
                    raise
                out.append(on_failure(item, e))  # this input fails on its own
            break
    return out


def _write_from_chunks(name, split, fp, specs, out, storage, *chunks):
    decoded = [d for chunk in chunks for d in chunk]
    return write_shard(name, split, fp, specs, decoded, out, storage)
