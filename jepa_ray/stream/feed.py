"""The training stream: one sequence of samples across epochs, dealt to the ranks by position.

Why not Ray Train's `streaming_split`: it hands blocks to whichever rank asks first, so where an
interrupted epoch stood is recorded nowhere; a resumed run can only start that epoch's pass over
(samples repeated, others missed); and each epoch is a new execution whose start stalls every
trainer. Here instead:

The sequence. Epoch e's *units* are the train split's shards in an order drawn from (seed, e),
taken in consecutive runs of at least `pipeline.shuffle_buffer` samples (one shard each when 0).
A unit is read whole, its samples permuted by (seed, e, unit), then transformed (crops, jitter and
masks drawn from seed, e and the sample key). Epochs follow one another in one Ray Data execution
with ordered output, so the stream does not stop at an epoch boundary.

Dealing. Micro-batch m of rank r of W takes rows [(m W + r) B, (m W + r + 1) B) of the sequence
(B = pipeline.batch_size): which sample a step sees does not depend on timing, and the rows of a
step do not depend on W. A `Feed` actor (one per run, made by the driver, so it outlives a worker
group) runs the execution and answers each rank with references to the blocks holding its rows;
the rank fetches and slices them in a prefetch thread (`FeedStream`).

Position. Every row carries (epoch, unit, index in the unit's order). A checkpoint records the
cursor after the last row of its last micro-batch; a resumed run, at any world size, restarts the
sequence there: that unit is read again and its first `index` samples are dropped before decoding.
So over an interrupted run every epoch delivers every training sample exactly once, with no
samples dropped at epoch ends; samples skipped as damaged are the ledger's (`ledger.SkipLedger`).
Its cost: a unit is held whole in its read task (at most `prepare.shards.max_bytes` of raw bytes
per shard), and a resume re-reads (without decoding) the part of one unit already seen.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from jepa_ray.config import PipelineConfig
from jepa_ray.console import quiet_ray_data
from jepa_ray.stream.pipeline import BLOCK_SAMPLES, ROWS_PER_BLOCK, ShardSet, bytes_per_sample, collate

log = logging.getLogger("jepa_ray.stream")

POSITION = ("_epoch", "_unit", "_row")  # the columns every row carries: where it is in the sequence
CURSOR = "_cursor"  # a batch's (epoch, unit, row) after its last row


@dataclass(frozen=True)
class Cursor:
    """A place in the sequence: the `row`-th sample (in the unit's order) of `unit` of `epoch`."""

    epoch: int = 0
    unit: int = 0
    row: int = 0


class Order:
    """Which shards make up each unit of an epoch (shuffled per epoch for training, the manifest's
    order otherwise), and each unit's sample order."""

    def __init__(self, shards: ShardSet, seed: int, shuffle_buffer: int, train: bool) -> None:
        self.names = [p.rsplit("/", 1)[-1] for p in shards.paths]
        self.paths = dict(zip(self.names, shards.paths, strict=True))
        self.counts = [shards.expected[n] for n in self.names]
        self.seed, self.train = seed, train
        self.per_unit = max(shuffle_buffer, 1) if train else 1

    def units(self, epoch: int) -> list[list[str]]:
        order = (
            np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.names))
            if self.train
            else range(len(self.names))
        )
        units, unit, held = [], [], 0
        for i in order:
            unit.append(self.names[i])
            held += self.counts[i]
            if held >= self.per_unit:
                units.append(unit)
                unit, held = [], 0
        if unit:
            units.append(unit)
        return units

    def permutation(self, epoch: int, unit: int, n: int) -> np.ndarray:
        if not self.train:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, unit + 1]).permutation(n)

    def epochs_for(self, rows: int) -> int:
        """Epochs that hold `rows` samples, and one more for samples skipped as damaged."""
        return max(1, math.ceil(rows / max(sum(self.counts), 1))) + 1


def _read_units(items: dict[str, np.ndarray], *, order: Order, filesystem: Any, ledger: Any, limit: int):
    """Ray Data map: each item (epoch, unit, skip) -> its unit's raw samples in the unit's order from
    `skip` on, in blocks of ROWS_PER_BLOCK, with the POSITION columns."""
    from jepa_ray.stream.ledger import report_bad
    from jepa_ray.stream.reader import raw_block, tar_samples

    for epoch, unit, skip in zip(items["epoch"], items["unit"], items["skip"], strict=True):
        epoch, unit, skip = int(epoch), int(unit), int(skip)
        samples = []
        for name in order.units(epoch)[unit]:

            def damaged(where: str, reason: str, lost: int, name: str = name, epoch: int = epoch) -> None:
                report_bad(ledger, limit, name, where, reason, lost, epoch=epoch)

            expected = order.counts[order.names.index(name)]
            with filesystem.open_input_stream(order.paths[name]) as f:
                samples.extend(tar_samples(f, name, expected, damaged))
        perm = order.permutation(epoch, unit, len(samples))
        for start in range(skip, len(samples), ROWS_PER_BLOCK):
            rows = range(start, min(start + ROWS_PER_BLOCK, len(samples)))
            extra = {"_epoch": [epoch] * len(rows), "_unit": [unit] * len(rows), "_row": list(rows)}
            yield raw_block([samples[perm[i]] for i in rows], extra)


def _transform(batch: dict[str, np.ndarray], *, spec, cfg: PipelineConfig, train: bool, ledger: Any):
    """Ray Data map: one block of raw samples (all of one unit) -> model inputs, POSITION kept."""
    from jepa_ray.stream.ledger import report_bad
    from jepa_ray.stream.transform import transform_batch

    epoch = int(batch["_epoch"][0]) if len(batch["_epoch"]) else 0

    def on_bad(shard: str, key: str, reason: str) -> None:
        report_bad(ledger, cfg.max_bad_samples, shard, key, reason, epoch=epoch)

    out = transform_batch(batch, spec, cfg, train=train, epoch=epoch if train else 0, on_bad=on_bad)
    index = {str(k): i for i, k in enumerate(batch["key"])}
    kept = np.array([index[str(k)] for k in out["key"]], dtype=np.int64)
    for name in POSITION:
        out[name] = np.asarray(batch[name], dtype=np.int64)[kept]
    return out


def sequence_dataset(
    shards: ShardSet, cfg: PipelineConfig, *, train: bool, start: Cursor, epochs: int, ledger: Any,
    cpus: float | None = None, verbose: bool = False,
):  # fmt: skip
    """The ordered Ray Dataset of the sequence from `start` over `epochs` epochs; with `cpus`, at
    most that many of its tasks (one CPU each) run at once."""
    import ray
    from ray.data import ExecutionResources, TaskPoolStrategy

    from jepa_ray.console import ray_data_progress
    from jepa_ray.storage import pyarrow_filesystem

    order = Order(shards, cfg.seed, cfg.shuffle_buffer, train)
    items = []
    for epoch in range(start.epoch, start.epoch + epochs):
        for unit in range(len(order.units(epoch))):
            if (epoch, unit) < (start.epoch, start.unit):
                continue
            skip = start.row if (epoch, unit) == (start.epoch, start.unit) else 0
            items.append({"epoch": epoch, "unit": unit, "skip": skip})
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # With reservation off (below) Ray Data does not hold its tasks to `resource_limits`: a run's
    # stream, primed before its worker group's placement group exists, took every CPU of a 2-CPU
    # node and kept the group waiting past Ray Train's 60 s start timeout (measured). A task
    # pool's size is a cap it keeps.
    compute = TaskPoolStrategy(size=max(1, int(cpus))) if cpus is not None else None
    ds = ds.map_batches(
        _read_units,
        compute=compute,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "order": order,
            "filesystem": pyarrow_filesystem(shards.url, shards.storage),
            "ledger": ledger,
            "limit": cfg.max_bad_samples,
        },
    )
    ds = ds.map_batches(
        _transform,
        compute=compute,
        batch_size=None,  # each block the reader yields is one call, all of one unit
        batch_format="numpy",
        fn_kwargs={"spec": shards.spec, "cfg": cfg, "train": train, "ledger": ledger},
        zero_copy_batch=True,
    )
    ctx = ds.context
    ctx.execution_options.preserve_order = True
    ctx.target_max_block_size = BLOCK_SAMPLES * bytes_per_sample(shards.spec, cfg)
    ctx.op_resource_reservation_enabled = False  # as in pipeline.build_dataset: one fused operator
    if cpus is not None:
        ctx.execution_options.resource_limits = ExecutionResources(cpu=cpus)
    ray_data_progress(ctx, verbose)
    return ds


def _entries(bundle: Any) -> Iterator[tuple[Any, int, int]]:
    """(block ref, first row, end row) of each block of a Ray Data RefBundle."""
    slices = getattr(bundle, "slices", None) or [None] * len(bundle.blocks)
    for entry, piece in zip(bundle.blocks, slices, strict=True):
        ref, meta = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
        if piece is None:
            yield ref, 0, meta.num_rows
        else:
            yield ref, piece.start_offset, piece.end_offset


class StaleFeed(RuntimeError):
    """A request from a worker group that the feed has since been restarted for."""


class Feed:
    """The run's sequence, dealt by position (a threaded Ray actor made by `new_feed`).

    `start` (rank 0 of each worker group, with the checkpoint's cursor and the group's world size)
    begins the sequence there and returns a generation number; `take` answers a rank's request for
    micro-batch m of that generation with [(block ref, first row, end row)]. Blocks every rank has
    passed are dropped; the execution runs at most `lookahead` rows ahead of the slowest rank.
    """

    def __init__(
        self, train: ShardSet, val: ShardSet | None, cfg: PipelineConfig, ledger: Any, cpus: float | None,
        verbose: bool = False,
    ) -> None:  # fmt: skip
        self.train, self.val_set, self.cfg, self.ledger = train, val, cfg, ledger
        self.cpus, self.verbose = cpus, verbose
        quiet_ray_data(verbose)  # its executions' INFO lines to Ray Data's log files, not the console
        self.cond = threading.Condition()
        self.generation = 0
        self.val_cache: dict[tuple, list] = {}
        self.val_lock = threading.Lock()  # the ranks ask at once: one pass serves them all
        self.primed: tuple[int | None, tuple | None] = (None, None)  # (generation, cursor) of `prime`
        self._reset(1)

    def _reset(self, world: int) -> None:
        self.world = world
        self.buffer: deque = deque()  # (first row, ref, lo, hi): rows [first, first + hi - lo)
        self.end = 0  # rows buffered so far (the sequence's rows since the start)
        self.asked = [0] * world  # each rank's latest requested first row
        self.error: BaseException | None = None

    def prime(self, cursor: tuple[int, int, int], rows: int, lookahead: int) -> int:
        """Begin the sequence at `cursor` before any rank asks: a run's driver calls it while its
        worker group starts (tens of seconds: processes, imports, the process group), so that the
        first batch is ready when rank 0 starts the same cursor. A `start` elsewhere replaces it,
        at the cost of the rows read for nothing."""
        with self.cond:
            gen = self._next_generation(1, lookahead)
            self.primed = (gen, tuple(cursor))
        threading.Thread(target=self._fill, args=(gen, Cursor(*cursor), rows), daemon=True).start()
        return gen

    def start(self, cursor: tuple[int, int, int], world: int, rows: int, lookahead: int) -> int:
        """Begin the sequence at `cursor` for `world` ranks; `rows`: what the run still needs (the
        first execution's epochs; the sequence goes on past them either way). A primed sequence
        at the same cursor is carried on, not restarted (no rank has taken from it yet)."""
        with self.cond:
            primed, at = self.primed
            self.primed = (None, None)
            if primed == self.generation and at == tuple(cursor) and self.error is None:
                self.world, self.asked, self.lookahead = world, [0] * world, lookahead
                self.cond.notify_all()
                return primed
            gen = self._next_generation(world, lookahead)
        threading.Thread(target=self._fill, args=(gen, Cursor(*cursor), rows), daemon=True).start()
        return gen

    def _next_generation(self, world: int, lookahead: int) -> int:
        """(Under the lock.) A new generation for `world` ranks; an older one's filler stops."""
        self.generation += 1
        self._reset(world)
        self.lookahead = lookahead
        self.cond.notify_all()
        return self.generation

    def _fill(self, gen: int, cursor: Cursor, rows: int) -> None:
        order = Order(self.train, self.cfg.seed, self.cfg.shuffle_buffer, True)
        epochs = order.epochs_for(rows)
        try:
            while True:
                ds = sequence_dataset(
                    self.train, self.cfg, train=True, start=cursor, epochs=epochs, ledger=self.ledger,
                    cpus=self.cpus, verbose=self.verbose,
                )  # fmt: skip
                for bundle in ds.iter_internal_ref_bundles():
                    for ref, lo, hi in _entries(bundle):
                        with self.cond:
                            while gen == self.generation and self.end - min(self.asked) > self.lookahead:
                                self.cond.wait(1.0)
                            if gen != self.generation:
                                return
                            self.buffer.append((self.end, ref, lo, hi))
                            self.end += hi - lo
                            self.cond.notify_all()
                # the run needs more (samples were skipped as damaged) or the ranks read ahead
                cursor, epochs = Cursor(cursor.epoch + epochs), order.epochs_for(self.lookahead)
        except BaseException as e:  # handed to the ranks, which fail the run with it
            with self.cond:
                if gen == self.generation:
                    self.error = e
                    self.cond.notify_all()

    def take(self, gen: int, rank: int, m: int) -> list[tuple[Any, int, int]]:
        """Rank `rank`'s micro-batch `m` of generation `gen`: its blocks' refs and row ranges."""
        b = self.cfg.batch_size
        first = (m * self.world + rank) * b
        with self.cond:
            if gen != self.generation:
                raise StaleFeed(f"generation {gen} was replaced by {self.generation}")
            self.asked[rank] = first
            floor = min(self.asked)
            while self.buffer and self.buffer[0][0] + self.buffer[0][3] - self.buffer[0][2] <= floor:
                self.buffer.popleft()  # every rank has passed it
            self.cond.notify_all()
            while self.end < first + b and self.error is None and gen == self.generation:
                self.cond.wait(1.0)
            if gen != self.generation:
                raise StaleFeed(f"generation {gen} was replaced by {self.generation}")
            if self.error is not None and self.end < first + b:
                raise self.error
            return _pieces(self.buffer, first, first + b)

    def progress_bars(self) -> tuple[bool, bool]:
        """Whether its executions show Ray Data's (dataset, operator) progress bars."""
        ds = sequence_dataset(
            self.train,
            self.cfg,
            train=True,
            start=Cursor(),
            epochs=1,
            ledger=self.ledger,
            verbose=self.verbose,
        )
        return ds.context.enable_progress_bars, ds.context.enable_operator_progress_bars

    def val(self, rank: int, world: int, n: int) -> list[list[tuple[Any, int, int]]]:
        """Rank's first `n` validation micro-batches, dealt as training's are, from one ordered
        pass (made once per world size and kept); a split too small for them all gives fewer, the
        last of them partial."""
        if self.val_set is None or n == 0:
            return []
        b = self.cfg.batch_size
        key = (world, n)
        with self.val_lock:
            if key not in self.val_cache:
                self.val_cache[key] = self._val_pass(world, n)
        buffer, end = self.val_cache[key]
        out = []
        for m in range(n):
            first = (m * world + rank) * b
            if first >= end:
                break
            out.append(_pieces(buffer, first, min(first + b, end)))
        return out

    def _val_pass(self, world: int, n: int) -> tuple[list, int]:
        """The validation split's first n x world micro-batches of rows, in order, as buffer entries."""
        b = self.cfg.batch_size
        ds = sequence_dataset(
            self.val_set, self.cfg, train=False, start=Cursor(), epochs=1, ledger=self.ledger,
            cpus=self.cpus, verbose=self.verbose,
        )  # fmt: skip
        buffer, end = [], 0
        for bundle in ds.iter_internal_ref_bundles():
            for ref, lo, hi in _entries(bundle):
                buffer.append((end, ref, lo, hi))
                end += hi - lo
            if end >= n * world * b:
                break
        return buffer, end


def _pieces(buffer, first: int, end: int) -> list[tuple[Any, int, int]]:
    out = []
    for start, ref, lo, hi in buffer:
        stop = start + hi - lo
        if stop <= first:
            continue
        if start >= end:
            break
        a, z = max(first, start), min(end, stop)
        out.append((ref, lo + a - start, lo + z - start))
    return out


def lookahead_rows(cfg: PipelineConfig, world: int) -> int:
    """How far the feed's execution may run ahead of the slowest rank: every rank's prefetch and
    the batch in hand, two more micro-batches, and two output blocks."""
    return (cfg.prefetch_batches + 4) * cfg.batch_size * world + 2 * BLOCK_SAMPLES


def new_feed(train: ShardSet, val: ShardSet | None, cfg: PipelineConfig, ledger: Any, cpus: float | None,
             verbose: bool = False, max_workers: int = 1):  # fmt: skip
    """A `Feed` actor (no CPU) for a run, on this process's node (`here`); it lives as long as
    the process that makes it."""
    import ray

    from jepa_ray.stream.pipeline import here

    return (
        ray.remote(Feed)
        .options(num_cpus=0, max_concurrency=2 * max_workers + 4, scheduling_strategy=here())
        .remote(train, val, cfg, ledger, cpus, verbose)
    )


def assemble(pieces: list[tuple[Any, int, int]]) -> dict[str, Any]:
    """A collated torch batch from block pieces, with CURSOR: the position after its last row."""
    import ray
    from ray.data.block import BlockAccessor

    blocks = ray.get([ref for ref, _, _ in pieces])
    parts = [
        BlockAccessor.for_block(BlockAccessor.for_block(block).slice(lo, hi, copy=False)).to_batch_format(
            "numpy"
        )
        for block, (_, lo, hi) in zip(blocks, pieces, strict=True)
    ]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    unit, row = batch.pop("_unit"), batch.pop("_row")
    out = collate(batch)  # "_epoch" stays: each sample's epoch
    out[CURSOR] = (int(batch["_epoch"][-1]), int(unit[-1]), int(row[-1]) + 1)
    return out


class FeedStream:
    """A rank's batches from a `Feed`, fetched and collated `prefetch` ahead in a thread."""

    def __init__(self, feed: Any, gen: int, rank: int, prefetch: int) -> None:
        self.feed, self.gen, self.rank = feed, gen, rank
        self.queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import ray

        m = 0
        while not self.stopped.is_set():
            try:
                item: Any = assemble(ray.get(self.feed.take.remote(self.gen, self.rank, m)))
            except BaseException as e:
                item = e
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=1.0)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            m += 1

    def __iter__(self) -> FeedStream:
        return self

    def __next__(self) -> dict[str, Any]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()


def val_batches(feed: Any, rank: int, world: int, n: int) -> list[dict[str, Any]]:
    """Rank's validation batches from the feed (`Feed.val`)."""
    import ray

    return [assemble(p) for p in ray.get(feed.val.remote(rank, world, n))]
