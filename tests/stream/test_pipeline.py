"""The Ray Data pipeline end to end: every sample once, epochs, workers, damaged shards, S3."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest
import torch
from shardkit import raw_samples

from jepa_ray.config import StorageConfig, load_config
from jepa_ray.errors import ShardError
from jepa_ray.stream.pipeline import (
    build_dataset,
    iter_training_batches,
    mask_indices,
    new_ledger,
    open_split,
    skipped_samples,
)


def _cfg(*overrides: str):
    return load_config(
        overrides=["pipeline.image_size=64", "pipeline.patch_size=8", "pipeline.batch_size=8", *overrides]
    ).pipeline


def _epoch(ds, cfg, train: bool = False) -> dict[str, dict]:
    """key -> that sample's tensors, over one pass."""
    out = {}
    for batch in iter_training_batches(ds, cfg, train=train):
        for j, key in enumerate(batch["key"]):
            assert key not in out, f"{key} seen twice in one epoch"
            out[key] = {k: v[j] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return out


@pytest.fixture(scope="module")
def split(small_shards):
    return open_split(str(small_shards), "train")


@pytest.fixture(scope="module")
def all_keys(split):
    keys = set()
    for p in split.paths:
        keys |= set(raw_samples(p))
    return keys


def test_one_epoch_streams_every_sample_once_as_torch_batches(ray_session, split, all_keys):
    cfg = _cfg()
    seen = {}
    for batch in iter_training_batches(build_dataset(split, cfg, train=False), cfg, train=False):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (1, 64, 64)
        assert len(batch["key"]) <= 8
        # the index tensors list exactly the True positions of the masks
        for name in ("img_ctx", "img_tgt"):
            idx, keep, mask = batch[f"{name}_idx"], batch[f"{name}_keep"], batch[name]
            assert idx.shape == keep.shape and idx.shape[:-1] == mask.shape[:-1]
            rebuilt = torch.zeros(mask.shape, dtype=torch.int32).scatter_add_(-1, idx, keep.int())
            assert torch.equal(rebuilt > 0, mask) and rebuilt.max() <= 1
        for key in batch["key"]:
            seen[key] = seen.get(key, 0) + 1
    assert set(seen) == all_keys and set(seen.values()) == {1}
    assert len(seen) == split.samples


def test_mask_indices_pads_and_marks_real_entries():
    mask = torch.tensor([[True, False, True, False], [False, False, False, True], [False] * 4])
    idx, keep = mask_indices(mask)
    assert idx.tolist() == [[0, 2], [3, 0], [0, 0]]
    assert keep.tolist() == [[True, True], [True, False], [False, False]]


def test_same_seed_same_epoch_same_samples_and_masks_new_epoch_new_masks(ray_session, split):
    cfg = _cfg()
    a = build_dataset(split, cfg, train=True)
    a0, a1 = _epoch(a, cfg), _epoch(a, cfg)
    b = build_dataset(split, cfg, train=True)
    b0, b1 = _epoch(b, cfg), _epoch(b, cfg)
    assert a0.keys() == b0.keys() and a1.keys() == b1.keys()
    for key in a0:
        for name in ("image", "img_ctx", "img_tgt", "ehr_tgt", "policy"):
            assert torch.equal(a0[key][name], b0[key][name]), (key, name)
            assert torch.equal(a1[key][name], b1[key][name]), (key, name)
    changed = sum(not torch.equal(a0[k]["img_tgt"], a1[k]["img_tgt"]) for k in a0 if a0[k]["has_image"])
    assert changed > 0.8 * sum(bool(a0[k]["has_image"]) for k in a0)
    evaluation = build_dataset(split, cfg, train=False)
    e0, e1 = _epoch(evaluation, cfg), _epoch(evaluation, cfg)
    assert all(torch.equal(e0[k]["img_tgt"], e1[k]["img_tgt"]) for k in e0)  # evaluation masks stay put
    c0 = _epoch(build_dataset(split, _cfg("pipeline.seed=5"), train=True), cfg)
    assert any(not torch.equal(a0[k]["img_tgt"], c0[k]["img_tgt"]) for k in a0 if a0[k]["has_image"])


def test_two_workers_see_disjoint_data_that_covers_the_split(ray_session, split, all_keys):
    import ray

    cfg = _cfg()

    @ray.remote(num_cpus=0)
    def consume(it):
        return [k for b in iter_training_batches(it, cfg, train=False) for k in b["key"]]

    its = build_dataset(split, cfg, train=False).streaming_split(2, equal=False)
    first, second = ray.get([consume.remote(it) for it in its])
    assert first and second
    assert not set(first) & set(second)
    assert set(first) | set(second) == all_keys and len(first) + len(second) == len(all_keys)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _copy(small_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    return out


def _middle_train_shard(root):
    split = open_split(str(root), "train")
    return split, split.paths[len(split.paths) // 2]


def test_truncated_shard_in_the_middle_is_skipped_and_counted(ray_session, small_shards, tmp_path, all_keys):
    root = _copy(small_shards, tmp_path)
    split, path = _middle_train_shard(root)
    data = _read(path)
    kept = raw_samples(path)
    _write(path, data[: len(data) // 2])
    cfg = _cfg()
    ledger = new_ledger(cfg.max_bad_samples)
    seen = _epoch(build_dataset(split, cfg, train=False, ledger=ledger), cfg)
    report = skipped_samples(ledger, 0)
    name = path.rsplit("/", 1)[-1]
    lost = len(all_keys) - len(seen)
    assert 0 < lost < len(kept)
    assert report["skipped"] == lost
    [record] = report["records"]
    assert record["shard"] == name and "damaged" in record["reason"] and record["lost"] == lost
    assert set(seen) < all_keys and not (all_keys - set(seen)) - set(kept)


def test_too_many_skipped_samples_fail_the_epoch_naming_the_shard(ray_session, small_shards, tmp_path):
    root = _copy(small_shards, tmp_path)
    split, path = _middle_train_shard(root)
    _write(path, _read(path)[:1000])
    cfg = _cfg("pipeline.max_bad_samples=2")
    with pytest.raises(Exception, match=r"max_bad_samples=2.*" + path.rsplit("/", 1)[-1]):
        _epoch(build_dataset(split, cfg, train=False), cfg)


def test_corrupt_header_mid_tar_is_counted_not_silent(ray_session, small_shards, tmp_path, all_keys):
    root = _copy(small_shards, tmp_path)
    split, path = _middle_train_shard(root)
    data = bytearray(_read(path))
    with tarfile.open(path) as tar:
        middle = [m.offset for m in tar][len(tar.getmembers()) // 2]
    data[middle : middle + 512] = b"\xff" * 512  # a garbled header
    _write(path, bytes(data))
    cfg = _cfg()
    ledger = new_ledger(cfg.max_bad_samples)
    seen = _epoch(build_dataset(split, cfg, train=False, ledger=ledger), cfg)
    report = skipped_samples(ledger, 0)
    assert report["skipped"] == len(all_keys) - len(seen) > 0
    assert "ends early" in report["records"][0]["reason"]


def test_a_sample_missing_a_field_is_skipped_and_counted(ray_session, small_shards, tmp_path, all_keys):
    root = _copy(small_shards, tmp_path)
    split, path = _middle_train_shard(root)
    samples = raw_samples(path)
    victim = next(k for k, v in samples.items() if "image" in v)
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src:
            if m.name != f"{victim}.image.npy":
                dst.addfile(m, src.extractfile(m))
    _write(path, buf.getvalue())
    cfg = _cfg()
    ledger = new_ledger(cfg.max_bad_samples)
    seen = _epoch(build_dataset(split, cfg, train=False, ledger=ledger), cfg)
    assert set(seen) == all_keys - {victim}
    [record] = skipped_samples(ledger, 0)["records"]
    assert record["key"] == victim and "image.npy is missing" in record["reason"]


def test_s3_gives_the_same_samples_as_the_local_copy(ray_session, small_shards, s3_bucket):
    import boto3

    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for p in sorted(small_shards.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"cohort/{p.relative_to(small_shards)}")
    cfg = _cfg()
    remote = open_split(f"s3://{bucket}/cohort", "val", StorageConfig(endpoint_url=endpoint))
    local = open_split(str(small_shards), "val")
    r, loc = (
        _epoch(build_dataset(remote, cfg, train=False), cfg),
        _epoch(build_dataset(local, cfg, train=False), cfg),
    )
    assert r.keys() == loc.keys() and len(r) == local.samples
    for key in r:
        for name, value in r[key].items():
            assert torch.equal(value, loc[key][name]), (key, name)


def test_open_split_names_what_is_wrong(small_shards, tmp_path):
    with pytest.raises(ShardError, match=r"no split 'tarin'.*test, train, val"):
        open_split(str(small_shards), "tarin")
    with pytest.raises(ShardError, match="no manifest"):
        open_split(str(tmp_path), "train")
    root = _copy(small_shards, tmp_path)
    _, path = _middle_train_shard(root)
    (root / path.rsplit("/", 1)[-1]).unlink()
    with pytest.raises(
        ShardError, match=r"1 shard\(s\) of split 'train'.*missing.*" + path.rsplit("/", 1)[-1]
    ):
        open_split(str(root), "train")


def test_image_only_and_ehr_only_samples_share_batches(ray_session, split):
    cfg = _cfg("pipeline.batch_size=16")
    mixed = 0
    for batch in iter_training_batches(build_dataset(split, cfg, train=True), cfg):
        has_i, has_e = batch["has_image"], batch["has_ehr"]
        assert (has_i | has_e).all()
        mixed += bool((has_i & ~has_e).any() or (~has_i & has_e).any())
        ctx_any = batch["img_ctx"].any(-1) | batch["ehr_ctx"].any(-1)
        tgt_any = batch["img_tgt"].flatten(1).any(-1) | batch["ehr_tgt"].any(-1)
        assert (ctx_any == tgt_any).all()  # a sample with a policy has both context and targets
    assert mixed > 0
