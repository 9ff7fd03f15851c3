"""Hostile and broken inputs end in quarantine with their reason, within bounded memory, and the
rest of the run goes on: decompression bombs, pixel and voxel bombs, unexpected errors, crashing
workers."""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import pytest
from ctkit import phantom, write_series
from hostilekit import ct_bomb, deflate_bomb, meta_length, rle_bomb, rle_image

from jepa_ray.config import ImageConfig, LimitsConfig, PrepareConfig, VolumeConfig, load_config
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest import write as shardlib
from jepa_ray.ingest.header import read_header
from jepa_ray.ingest.image import read_image
from jepa_ray.ingest.series import assemble, group_series
from jepa_ray.ingest.tasks import TaskMap, crashed_scan, scan_headers, write_shards
from jepa_ray.ingest.write import SampleSpec, decode_images

CFG = ImageConfig(size=32)
VOLUME = VolumeConfig(enabled=True, min_slices=4, size=(8, 16, 16))


def _refused(fn, reason: str, max_mib: float = 48, max_s: float = 10):
    """Run fn, expecting InvalidDicomError(reason); return it after checking time and peak memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(InvalidDicomError) as info:
            fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == reason, info.value
    assert peak < max_mib * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"
    assert time.perf_counter() - t0 < max_s
    return info.value


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path):
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 600 * 2**20)  # 600 MiB of zeros
    assert bomb.stat().st_size < 2 * 2**20
    e = _refused(lambda: read_header(bomb), "over_limit")
    assert "max_inflated_bytes" in e.detail and str(bomb) in str(e)
    _refused(lambda: read_image(bomb, CFG), "over_limit")
    # the same construction under the limit is an ordinary deflated file: the check refuses size only
    small = deflate_bomb(tmp_path / "small.dcm", 2**20)
    assert read_header(small).safe["rows"] == 724
    _refused(lambda: read_header(small, LimitsConfig(max_inflated_bytes=2**19)), "over_limit")


def test_a_corrupt_deflate_stream_is_an_unreadable_header(tmp_path):
    path = deflate_bomb(tmp_path / "bad.dcm", 2**20)
    data = bytearray(path.read_bytes())
    start = meta_length(path)
    data[start : start + 16] = b"\xff" * 16  # no valid deflate block starts like this
    path.write_bytes(bytes(data))
    e = _refused(lambda: read_header(path), "unreadable_header")
    assert str(path) in str(e)


def test_pixel_and_file_size_caps_refuse_before_decoding(tmp_path):
    bomb = rle_bomb(tmp_path / "rle.dcm")  # 11000 x 11000: 242 MB decoded, ~1 GB inside the decoder
    assert bomb.stat().st_size < 4 * 2**20
    e = _refused(lambda: read_image(bomb, CFG), "over_limit")
    assert "11000x11000" in e.detail and "max_pixels" in e.detail
    # a lower cap refuses an image an ordinary one admits
    ok = rle_image(tmp_path / "ok.dcm", 256, 256)
    _, image, _ = read_image(ok, CFG)
    assert image.shape == (1, 32, 32)
    _refused(lambda: read_image(ok, CFG, LimitsConfig(max_pixels=128 * 128)), "over_limit")
    e = _refused(lambda: read_header(ok, LimitsConfig(max_file_bytes=1024)), "over_limit")
    assert "max_file_bytes" in e.detail


def test_a_ct_series_over_the_caps_is_refused_before_any_pixel_is_read(tmp_path):
    series, problems = group_series(ct_bomb(tmp_path / "bomb"))  # 8 x 40000 x 40000: 51 GB as float32
    assert not series and len(problems) == 8
    assert {p.reason for p in problems} == {"over_limit"}
    # within the slice cap but over the voxel cap: refused before the volume is allocated
    paths = write_series(tmp_path / "ct", phantom(12))
    series, problems = group_series(paths)
    assert not problems
    refs = next(iter(series.values()))
    limits = LimitsConfig(max_voxels=11 * 24 * 20)
    e = _refused(lambda: assemble(refs, VOLUME, limits), "over_limit")
    assert "12 slices of 24x20" in e.detail
    assert assemble(refs, VOLUME, LimitsConfig(max_voxels=12 * 24 * 20)).hu.shape == (12, 24, 20)
    # in a shard task: the series is quarantined, one record naming its file count
    [res] = decode_images([[(str(p), p.name) for p in paths]], CFG, VOLUME, ["ct"], limits)
    assert res["image"] is None
    [q] = res["quarantine"]
    assert q["reason"] == "over_limit" and q["count"] == 12


def test_limits_are_validated_and_reach_the_shard_fingerprint():
    with pytest.raises(Exception, match="max_pixels"):
        load_config(overrides=["prepare.limits.max_pixels=0"])
    cfg = load_config(overrides=["prepare.limits.max_voxels=100000"]).prepare
    assert cfg.limits.max_voxels == 100000 and PrepareConfig().limits.max_voxels == 2**28


def test_an_unexpected_error_quarantines_only_its_input(tmp_path, monkeypatch):
    good = [rle_image(tmp_path / f"g{i}.dcm") for i in range(2)]
    bad = rle_image(tmp_path / "bad.dcm")
    real = read_image

    def flaky(path, cfg, limits=None):
        if os.fspath(path) == str(bad):
            raise MemoryError("Unable to allocate for Doe^Jane")  # the message must not be kept
        return real(path, cfg, limits)

    monkeypatch.setattr("jepa_ray.ingest.image.read_image", flaky)
    out = decode_images([[(str(p), p.name)] for p in (good[0], bad, good[1])], CFG)
    assert out[0]["image"] is not None and out[2]["image"] is not None
    assert out[1]["image"] is None
    [q] = out[1]["quarantine"]
    assert q == {
        "input": "bad.dcm",
        "kind": "dicom",
        "reason": "unexpected_error",
        "detail": "MemoryError while reading this file; the rest of the run goes on",
    }
    # the header scan, and a CT study, the same way
    monkeypatch.setattr(
        "jepa_ray.ingest.header.read_header", lambda p, limits=None: (_ for _ in ()).throw(ValueError("Doe"))
    )
    [rec] = scan_headers([str(bad)])
    assert rec["reason"] == "unexpected_error" and "Doe" not in rec["detail"]
    monkeypatch.setattr(shardlib, "_decode_ct", lambda *a: 1 / 0)
    [res] = decode_images([[(str(good[0]), "a"), (str(good[1]), "b")]], CFG, VOLUME, ["ct"])
    assert [q["input"] for q in res["quarantine"]] == ["a", "b"]
    assert {q["reason"] for q in res["quarantine"]} == {"unexpected_error"}


def test_a_worker_that_dies_quarantines_only_the_input_that_kills_it(ray_session, tmp_path):
    files = [str(rle_image(tmp_path / f"{i}.dcm")) for i in range(5)]
    killer = files[2]

    def scan(paths, limits):
        if killer in paths:
            os._exit(1)  # a decoder that takes its process down with it
        return scan_headers(paths, limits)

    chunks = [files[:3], files[3:]]
    out = TaskMap(scan, chunks, "scan", False, args=(LimitsConfig(),), on_failure=crashed_scan).results()
    assert [len(c) for c in out] == [3, 2]
    crashed = out[0][2]
    assert crashed["input"] == killer and crashed["reason"] == "worker_crashed"
    assert "also when read alone" in crashed["detail"]
    others = [x for chunk in out for x in chunk if x is not crashed]
    assert all(not isinstance(x, dict) and x.safe["rows"] == 64 for x in others)


def test_a_task_lost_with_its_node_is_run_again_and_never_quarantines_its_inputs(ray_session, tmp_path):
    """A node lost (preempted) under a chunk's task, then under some of its inputs' own tasks: the
    inputs are read again, not recorded as inputs that crash a worker; a node lost on every try
    stops the run with Ray's error (a rerun resumes) rather than quarantine good files."""
    from ray.exceptions import NodeDiedError

    files = [str(rle_image(tmp_path / f"{i}.dcm")) for i in range(3)]
    tries = tmp_path / "tries"
    tries.mkdir()

    def scan(paths, limits, lost):  # the first `lost` tasks started are lost with their node
        (tries / os.urandom(8).hex()).touch()
        if len(list(tries.iterdir())) <= lost:
            raise NodeDiedError("Task failed because the node it was running on is dead or unavailable.")
        return scan_headers(paths, limits)

    blamed = []

    def crashed(path, error):
        blamed.append(path)
        return crashed_scan(path, error)

    out = TaskMap(scan, [files], "scan", False, args=(LimitsConfig(), 3), on_failure=crashed).results()
    assert blamed == [] and len(list(tries.iterdir())) > 4  # the chunk, 3 alone, at least one again
    assert [x.safe["rows"] for x in out[0]] == [64, 64, 64]

    with pytest.raises(NodeDiedError):
        TaskMap(scan, [files], "scan", False, args=(LimitsConfig(), 10**6), on_failure=crashed).results()
    assert blamed == []


def test_a_shard_whose_decoding_kills_a_worker_is_written_without_that_image(ray_session, tmp_path):
    files = [rle_image(tmp_path / f"{i}.dcm", patient=f"P{i}") for i in range(4)]
    killer = str(files[1])

    def decode(samples, image_cfg, volume_cfg, kinds, limits, *masks):
        if any(path == killer for dicoms in samples for path, _ in dicoms):
            os._exit(1)
        return decode_images(samples, image_cfg, volume_cfg, kinds, limits, *masks)

    ehr = {"codes": np.zeros(1, np.int32)}
    specs = [
        SampleSpec(key=f"k{i}", split="train", dicoms=[(str(p), p.name)], ehr=ehr if i == 1 else None)
        for i, p in enumerate(files)
    ]
    cfg = load_config(overrides=["prepare.image.size=32", "prepare.files_per_task=2"]).prepare
    records: dict = {}
    failures = write_shards(
        [("shard-000000", "train", "fp", specs)], cfg, str(tmp_path / "out"), records, False, decode
    )
    assert failures == []
    record = records["shard-000000"]
    assert record["image"] == 3 and (tmp_path / "out" / "shard-000000.tar").exists()
    [q] = record["quarantine"]
    assert q["input"] == "1.dcm" and q["reason"] == "worker_crashed"
