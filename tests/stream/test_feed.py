"""The training sequence (`jepa_ray.stream.feed`): one order over the epochs, dealt by position,
restartable at a cursor under another world size with every sample exactly once per epoch."""

from __future__ import annotations

from collections import Counter

import pytest
from shardkit import raw_samples

from jepa_ray.config import load_config
from jepa_ray.stream.feed import CURSOR, Order, assemble, lookahead_rows, new_feed
from jepa_ray.stream.pipeline import new_ledger, open_split

B = 4


@pytest.fixture(scope="module")
def split(small_shards):
    return open_split(str(small_shards), "train")


@pytest.fixture(scope="module")
def cfg():
    return load_config(
        overrides=["pipeline.image_size=32", "pipeline.patch_size=8", f"pipeline.batch_size={B}"]
    ).pipeline


@pytest.fixture
def feed(split, cfg, ray_session):
    ledger = new_ledger(cfg.max_bad_samples)
    actor = new_feed(split, None, cfg, ledger, cpus=1.0, max_workers=3)
    yield actor
    ray_session.kill(actor)
    ray_session.kill(ledger)


def _draw(ray, feed, cfg, world: int, start, micro_batches: int):
    """[(epoch, key)] of `micro_batches` steps of `world` ranks in sequence order, and the cursor
    after the last rank's last sample (what a checkpoint records)."""
    gen = ray.get(feed.start.remote(start, world, micro_batches * world * B, lookahead_rows(cfg, world)))
    return _take(ray, feed, gen, world, micro_batches)


def _take(ray, feed, gen: int, world: int, micro_batches: int):
    """`_draw`'s rows and cursor from generation `gen` of the feed, already started."""
    rows, cursor = [], None
    for m in range(micro_batches):
        for rank in range(world):
            batch = assemble(ray.get(feed.take.remote(gen, rank, m)))
            assert len(batch["key"]) == B and batch["image"].shape == (B, 1, 32, 32)
            rows += list(zip(batch["_epoch"].tolist(), batch["key"], strict=True))
            cursor = batch[CURSOR]
    return rows, cursor


def test_restarts_at_other_world_sizes_deliver_every_sample_once_per_epoch_in_one_order(
    ray_session, feed, split, cfg
):
    keys = set()
    for path in split.paths:
        keys |= set(raw_samples(path))
    n = len(keys)
    assert n == split.samples and n % B  # epochs end mid-batch: batches straddle them

    whole, _ = _draw(ray_session, feed, cfg, 1, (0, 0, 0), (3 * n) // B)  # one rank, no interruption
    first, cursor = _draw(ray_session, feed, cfg, 2, (0, 0, 0), 3)
    second, cursor = _draw(ray_session, feed, cfg, 1, cursor, 5)
    third, _ = _draw(ray_session, feed, cfg, 3, cursor, (3 * n - 64) // (3 * B))
    interrupted = first + second + third
    # the rows of a step do not depend on the world size, nor on where the run was interrupted
    assert interrupted == whole[: len(interrupted)]
    per_epoch = Counter(epoch for epoch, _ in interrupted)
    for epoch in sorted(per_epoch):
        seen = [k for e, k in interrupted if e == epoch]
        assert len(seen) == len(set(seen)), f"epoch {epoch} repeats samples"
        if epoch < max(per_epoch):
            assert set(seen) == keys, f"epoch {epoch} misses samples"
    assert max(per_epoch) >= 2
    # a new epoch is a new order (of shards and within them)
    assert [k for e, k in whole if e == 0] != [k for e, k in whole if e == 1]


def test_a_primed_sequence_is_carried_on_by_a_start_at_its_cursor_and_replaced_by_one_elsewhere(
    ray_session, feed, cfg
):
    """`prime` (the driver, while the worker group starts) begins the sequence; rank 0's `start`
    at the same cursor carries it on, with the rows an unprimed start gives; elsewhere it restarts."""
    ray, look = ray_session, lookahead_rows(cfg, 2)
    plain, cursor = _draw(ray, feed, cfg, 2, (0, 0, 0), 3)
    primed = ray.get(feed.prime.remote((0, 0, 0), 64, look))
    gen = ray.get(feed.start.remote((0, 0, 0), 2, 64, look))
    assert gen == primed and _take(ray, feed, gen, 2, 3)[0] == plain

    primed = ray.get(feed.prime.remote((0, 0, 0), 64, look))
    gen = ray.get(feed.start.remote(cursor, 1, 8, look))
    assert gen == primed + 1
    assert _take(ray, feed, gen, 1, 2)[0] == _draw(ray, feed, cfg, 1, cursor, 2)[0]


def test_a_primed_stream_leaves_the_cpus_it_was_not_given_free(ray_session, feed, split, cfg):
    """A feed given 1 CPU (what a run's workers leave of this 2-CPU cluster) runs at most one task
    at a time: the worker group's placement group, requested after the stream is primed, finds its
    CPU free. (Ray Data does not hold tasks to `resource_limits` with reservation off: both CPUs
    went to the stream and the group's start timed out.)"""
    import time

    ray = ray_session
    idle = time.monotonic() + 20  # an earlier test's actors may still be going away
    while (free := ray.available_resources().get("CPU", 0.0)) < 2.0 and time.monotonic() < idle:
        time.sleep(0.2)
    assert free == 2.0, "the shared cluster must be idle for this measurement"
    epochs = 6
    ray.get(feed.prime.remote((0, 0, 0), epochs * split.samples, epochs * split.samples))
    lowest, busy, deadline = free, 0, time.monotonic() + 5
    while time.monotonic() < deadline:
        now = ray.available_resources().get("CPU", 0.0)
        lowest, busy = min(lowest, now), busy + (now < free)
        time.sleep(0.05)
    assert busy > 0  # the stream ran while it was watched
    assert lowest >= 1.0, f"the primed stream held {free - lowest:g} CPUs"


def test_units_cover_the_shards_once_and_hold_at_least_the_shuffle_buffer(split):
    one = Order(split, seed=3, shuffle_buffer=0, train=True)
    assert sorted(n for u in one.units(0) for n in u) == sorted(one.names)
    assert all(len(u) == 1 for u in one.units(0)) and one.units(0) != one.units(1)
    assert one.units(0) == Order(split, seed=3, shuffle_buffer=0, train=True).units(0)
    big = Order(split, seed=3, shuffle_buffer=20, train=True)
    counts = dict(zip(big.names, big.counts, strict=True))
    units = big.units(0)
    assert sorted(n for u in units for n in u) == sorted(big.names)
    assert all(sum(counts[n] for n in u) >= 20 for u in units[:-1])
    assert Order(split, seed=3, shuffle_buffer=20, train=False).units(0) == [[n] for n in big.names]
