"""The streaming input pipeline: shards (local or s3://) -> Ray Data -> masked torch batches.

    ShardDatasource (read tars, file order shuffled per epoch)
      -> map_batches(transform_batch)   decode, crop/jitter as a batch, EHR arrays, masks
      -> iter_torch_batches(collate)    padded index tensors for the model, on the trainer side

Nothing is materialised: each epoch streams the split once. Inside a Ray Train worker:

    shard = ray.train.get_dataset_shard("train")
    for batch in iter_training_batches(shard, cfg.pipeline): ...

and outside Ray Train (evaluation, notebooks) the same `iter_training_batches(dataset, ...)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jepa_ray.config import PipelineConfig, StorageConfig
from jepa_ray.errors import ShardError
from jepa_ray.model.masks import mask_indices
from jepa_ray.shards.manifest import read_manifest
from jepa_ray.storage import Store, pyarrow_filesystem
from jepa_ray.stream.transform import FeatureSpec, transform_batch

ROWS_PER_BLOCK = 32  # samples the reader yields at a time: one map_batches call
BLOCK_SAMPLES = 128  # samples per output block handed to the consumer

# Arrays the model gathers with: (B, N) bool masks become padded index tensors.
_INDEXED = ("img_ctx", "img_tgt")


@dataclass
class ShardSet:
    """One split of a prepared shard set: where its shards are and what the manifest says."""

    url: str
    split: str
    manifest: dict[str, Any]
    spec: FeatureSpec
    paths: list[str]  # filesystem paths for the pyarrow filesystem
    expected: dict[str, int]  # shard name -> samples
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def samples(self) -> int:
        return sum(self.expected.values())


def open_split(url: str, split: str, storage: StorageConfig | None = None) -> ShardSet:
    """The shards of `split` under `url`; `ShardError` naming what is missing."""
    storage = storage or StorageConfig()
    store = Store(url, storage)
    manifest = read_manifest(store)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardError(
            f"{url}: no split {split!r} in the manifest; it has {', '.join(sorted(splits)) or 'none'}"
        )
    names = splits[split]["shards"]
    if not names:
        raise ShardError(f"{url}: split {split!r} has no shards")
    present = set(store.list())
    missing = [n for n in names if n not in present]
    if missing:
        raise ShardError(
            f"{url}: {len(missing)} shard(s) of split {split!r} listed in the manifest are missing "
            f"(first: {missing[0]}); rerun `jepa-ray prepare` to rewrite them"
        )
    counts = {s["name"]: s["samples"] for s in manifest["shards"]}
    return ShardSet(
        url=url,
        split=split,
        manifest=manifest,
        spec=FeatureSpec.from_manifest(manifest),
        paths=[store.path(n) for n in names],
        expected={n: counts[n] for n in names},
        storage=storage,
    )


def here():
    """A scheduling strategy for an actor that must live on this process's node: a run's ledger
    and data feed, which must survive the loss of any node but the one that drives the run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def new_ledger(limit: int):
    """A `SkipLedger` actor (no CPU, on this node: `here`) counting the samples skipped per epoch."""
    import ray

    from jepa_ray.stream.ledger import SkipLedger

    return ray.remote(num_cpus=0)(SkipLedger).options(scheduling_strategy=here()).remote(limit)


def _transform(batch, spec, cfg, train, ledger, keep_shard=False):
    from jepa_ray.stream.ledger import current_epoch, report_bad

    def on_bad(shard: str, key: str, reason: str) -> None:
        report_bad(ledger, cfg.max_bad_samples, shard, key, reason)

    # evaluation draws the same masks on every pass, so validation losses compare across epochs
    epoch = current_epoch() if train else 0
    out = transform_batch(batch, spec, cfg, train=train, epoch=epoch, on_bad=on_bad)
    if keep_shard:  # each row's shard (a search index tracks what each shard contributed)
        shard_of = dict(zip((str(k) for k in batch["key"]), (str(s) for s in batch["shard"]), strict=True))
        out["shard"] = np.array([shard_of[str(k)] for k in out["key"]], dtype=object)
    return out


def build_dataset(
    shards: ShardSet, cfg: PipelineConfig, *, train: bool, ledger: Any = None, keep_shard: bool = False
):
    """A `ray.data.Dataset` of transformed batches (numpy columns, see transform.py); with
    `keep_shard`, a `shard` column names each row's shard.

    train: file order shuffled per epoch (seeded), random crops and jitter; otherwise file order as
    in the manifest and no augmentation. Masks are drawn in both modes (the validation loss needs
    them); they depend only on the seed, the epoch and the sample key.
    """
    import ray
    from ray.data.datasource import FileShuffleConfig

    from jepa_ray.stream.reader import ShardDatasource

    ledger = ledger if ledger is not None else new_ledger(cfg.max_bad_samples)
    source = ShardDatasource(
        shards.paths,
        expected=shards.expected,
        ledger=ledger,
        limit=cfg.max_bad_samples,
        rows_per_block=ROWS_PER_BLOCK,
        filesystem=pyarrow_filesystem(shards.url, shards.storage),
        shuffle=FileShuffleConfig(seed=cfg.seed, reseed_after_execution=True) if train else None,
    )
    ds = ray.data.read_datasource(source, override_num_blocks=len(shards.paths))
    ds = ds.map_batches(
        _transform,
        batch_size=None,  # each block the reader yields (ROWS_PER_BLOCK samples) is one call
        batch_format="numpy",
        fn_kwargs={
            "spec": shards.spec,
            "cfg": cfg,
            "train": train,
            "ledger": ledger,
            "keep_shard": keep_shard,
        },
        zero_copy_batch=True,
    )
    # Output blocks of ~BLOCK_SAMPLES samples: a task hands them on as it goes instead of gathering
    # 128 MiB (a whole shard), so the first batch comes early and memory stays bounded; much smaller
    # blocks stall the read tasks on Ray Data's streaming-generator backpressure (measured).
    ds.context.target_max_block_size = BLOCK_SAMPLES * bytes_per_sample(shards.spec, cfg)
    # One fused operator has nothing to reserve resources against; with reservation on, Ray Data
    # keeps half the CPUs "reserved" and, on a small node, runs one read task at a time (measured:
    # 2 CPUs, one busy worker, half the throughput).
    ds.context.op_resource_reservation_enabled = False
    return ds


def bytes_per_sample(spec: FeatureSpec, cfg: PipelineConfig) -> int:
    n = max(math.prod(g) for g in cfg.grids)
    pixels = (cfg.image_size**2 if cfg.dims != 3 else 0) + (
        max(spec.volume_channels, 1) * math.prod(cfg.volume_size) if cfg.dims != 2 else 0
    )  # a mixed batch carries both arrays for every sample
    tokens = 1 + cfg.max_events
    return 4 * pixels + n * (1 + cfg.mask.num_target_blocks) + 16 * tokens + 4096


def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """numpy batch -> torch tensors, plus `<mask>_idx` / `<mask>_keep` for the image masks."""
    import torch

    out: dict[str, Any] = {}
    for name, arr in batch.items():
        if arr.dtype == object or arr.dtype.kind in "US":
            out[name] = [str(x) for x in arr]  # key, meta
        else:  # batches can be read-only views of the object store: torch needs its own copy
            out[name] = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    for name in _INDEXED:
        out[f"{name}_idx"], out[f"{name}_keep"] = mask_indices(out[name])
    return out


def _collate_fn():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return collate(batch)

    return Collate()


def iter_training_batches(
    source, cfg: PipelineConfig, *, train: bool = True, device: str | None = None
) -> Iterator[dict[str, Any]]:
    """Torch batches from a `Dataset` or a Train `DataIterator` (call once per epoch)."""
    for batch in source.iter_torch_batches(
        batch_size=cfg.batch_size,
        prefetch_batches=cfg.prefetch_batches,
        collate_fn=_collate_fn(),
        drop_last=train,
        local_shuffle_buffer_size=(cfg.shuffle_buffer or None) if train else None,
    ):
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
        yield batch


def skipped_samples(ledger, epoch: int | None = None) -> dict[str, Any]:
    """What the pipeline skipped: {"skipped": n, "records": [...]} for `epoch`, or per epoch."""
    import ray

    return ray.get(ledger.summary.remote(epoch))
