"""S3 that misbehaves: uploads and reads refused (503) or stalled are retried and land whole; one that keeps
failing is an error naming the object and leaves no object behind; a checkpoint directory copied
the way Ray Train copies it (pyarrow's copy_files onto `pyarrow_filesystem`) survives refusals."""

from __future__ import annotations

import os
import time

import pyarrow.fs as pafs
import pytest
from s3faults import FaultyS3

from jepa_ray.config import StorageConfig
from jepa_ray.errors import ShardError
from jepa_ray.storage import Store, pyarrow_filesystem


def _staged(store: Store, name: str, data: bytes) -> str:
    fd, tmp = store.staging_file(name)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


def test_refused_uploads_are_retried_and_land_whole(s3_bucket):
    endpoint, bucket = s3_bucket
    data = os.urandom(300_000)
    with FaultyS3(endpoint) as s3:
        s3.refuse("PUT", "/shard-000000.tar", times=2)
        store = Store(f"s3://{bucket}/data", StorageConfig(endpoint_url=s3.url, retries=3, timeout_s=5))
        tmp = _staged(store, "shard-000000.tar", data)
        store.put_file(tmp, "shard-000000.tar")
        assert s3.count("PUT", "/shard-000000.tar") == 3  # two refused, the third landed
        s3.refuse("GET", "/shard-000000.tar", times=2)  # and reading it back, as the stream does
        assert store.read_bytes("shard-000000.tar") == data
        with pyarrow_filesystem(store.url, store.cfg).open_input_stream(
            f"{bucket}/data/shard-000000.tar"
        ) as f:
            assert f.read() == data
    assert not os.path.exists(tmp)


def test_a_stalled_upload_is_abandoned_after_the_timeout_and_retried(s3_bucket):
    endpoint, bucket = s3_bucket
    with FaultyS3(endpoint) as s3:
        s3.stall("PUT", "/manifest.json", times=1, seconds=4)
        store = Store(f"s3://{bucket}/data", StorageConfig(endpoint_url=s3.url, retries=2, timeout_s=1))
        start = time.monotonic()
        store.write_bytes("manifest.json", b'{"shards": 3}')
        took = time.monotonic() - start
        assert s3.count("PUT", "/manifest.json") == 2
        assert store.read_bytes("manifest.json") == b'{"shards": 3}'
    assert took < 4  # the stalled request was given up after timeout_s, not waited out


def test_an_upload_that_keeps_failing_names_the_object_and_leaves_none(s3_bucket):
    endpoint, bucket = s3_bucket
    with FaultyS3(endpoint) as s3:
        store = Store(f"s3://{bucket}/data", StorageConfig(endpoint_url=s3.url, retries=2, timeout_s=5))
        store.write_bytes("shard-000000.tar", b"written before the outage")
        s3.refuse("PUT", "/shard-000001.tar", times=-1)
        tmp = _staged(store, "shard-000001.tar", os.urandom(1000))
        with pytest.raises(
            ShardError, match=rf"s3://{bucket}/data/shard-000001.tar: upload failed .*retried up to 2 times"
        ):
            store.put_file(tmp, "shard-000001.tar")
        assert s3.count("PUT", "/shard-000001.tar") == 3  # the first try and two retries
        with pytest.raises(ShardError, match=r"shard-000001.tar: upload failed"):
            store.write_bytes("shard-000001.tar", b"x")
        assert not store.exists("shard-000001.tar")
        assert store.read_bytes("shard-000000.tar") == b"written before the outage"  # nothing else lost
    assert not os.path.exists(tmp)


def test_a_checkpoint_copied_as_ray_train_copies_it_survives_refused_parts(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    ckpt = tmp_path / "checkpoint_000001"
    files = {"engine/model_states.pt": os.urandom(700_000), "meta.json": b"{}", "ema.pt": os.urandom(5000)}
    for name, data in files.items():
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(data)
    with FaultyS3(endpoint) as s3:
        s3.refuse("PUT", "/checkpoint_000001/", times=3)
        cfg = StorageConfig(endpoint_url=s3.url, retries=4, timeout_s=5)
        url = f"s3://{bucket}/runs/r1/checkpoint_000001"
        pafs.copy_files(str(ckpt), url.split("://")[1], destination_filesystem=pyarrow_filesystem(url, cfg))
        assert s3.count("PUT", "/checkpoint_000001/") >= len(files) + 3
        store = Store(url, cfg)
        for name, data in files.items():
            assert store.read_bytes(name) == data, name
