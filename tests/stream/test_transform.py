"""Per-batch transform: field shapes, dtypes and ranges, presence flags, determinism, bad samples."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from shardkit import raw_batch, raw_samples

from jepa_ray.config import load_config
from jepa_ray.errors import ShardError
from jepa_ray.model.masks import NO_POLICY
from jepa_ray.shards.format import decode_npz, encode_npz
from jepa_ray.stream.pipeline import open_split
from jepa_ray.stream.transform import EhrLayout, transform_batch


def _cfg(*overrides: str):
    return load_config(overrides=["pipeline.image_size=64", "pipeline.patch_size=8", *overrides]).pipeline


@pytest.fixture(scope="module")
def split(small_shards):
    return open_split(str(small_shards), "train")


@pytest.fixture(scope="module")
def samples(split):
    out = {}
    for p in split.paths:
        out.update(raw_samples(p))
    return out


def test_fields_shapes_dtypes_ranges_and_presence(split, samples):
    cfg = _cfg("pipeline.max_events=16", "pipeline.max_static_codes=4")
    out = transform_batch(raw_batch(samples), split.spec, cfg, train=True, epoch=0)
    spec = split.spec
    lay = EhrLayout.of(spec, cfg)
    b, n = len(samples), 64
    L = len(spec.num_names) + len(spec.cat_sizes) + 4 + 16
    assert lay.tokens == L and spec.model_dims(cfg)["ehr_tokens"] == L
    expected = {
        "image": ((b, 1, 64, 64), np.float32),
        "has_image": ((b,), np.bool_),
        "has_ehr": ((b,), np.bool_),
        "ehr_code": ((b, L), np.int64),
        "ehr_time": ((b, L), np.float32),
        "ehr_value": ((b, L), np.float32),
        "ehr_value_present": ((b, L), np.bool_),
        "ehr_valid": ((b, L), np.bool_),
        "policy": ((b,), np.int8),
        "img_ctx": ((b, n), np.bool_),
        "img_tgt": ((b, 4, n), np.bool_),
        "ehr_ctx": ((b, L), np.bool_),
        "ehr_tgt": ((b, L), np.bool_),
    }
    for name, (shape, dtype) in expected.items():
        assert out[name].shape == shape and out[name].dtype == dtype, name
    assert list(out["key"]) == list(samples)
    for j, key in enumerate(out["key"]):
        assert out["has_image"][j] == ("image" in samples[key])
        assert out["has_ehr"][j] == ("ehr" in samples[key])
        meta = json.loads(out["meta"][j])
        assert meta["has_image"] == out["has_image"][j]
    mean, std = cfg.normalize
    lo, hi = (0 - mean) / std, (1 - mean) / std
    img = out["image"][out["has_image"]]
    assert img.min() >= lo - 1e-5 and img.max() <= hi + 1e-5 and img.std() > 0.3
    assert (out["image"][~out["has_image"]] == 0).all()
    codes, valid = out["ehr_code"], out["ehr_valid"]
    assert (codes[:, lay.cat] < np.array(spec.cat_sizes)).all()
    assert (codes >= 0).all() and (codes < spec.vocab_size).all()
    assert (out["ehr_time"] >= 0).all() and (out["ehr_time"][:, : lay.events.start] == 0).all()
    assert np.abs(out["ehr_value"][:, lay.events]).max() <= 5
    # static feature tokens exist exactly when the sample has EHR; events are contiguous from the start
    assert (valid[:, : lay.static_codes.start] == out["has_ehr"][:, None]).all()
    assert (np.diff(valid[:, lay.events].astype(int), axis=1) <= 0).all() and not valid[~out["has_ehr"]].any()
    for j, key in enumerate(out["key"]):
        if out["has_ehr"][j]:
            arrays = decode_npz(samples[key]["ehr"])
            events = arrays["event_code"]
            k = min(events.size, 16)
            assert valid[j, lay.events].sum() == k
            assert (codes[j, lay.events][:k] == events[-16:]).all()
            num = arrays["static_num"]
            assert (out["ehr_value_present"][j, lay.num] == ~np.isnan(num)).all()
            expect = (num - spec.num_mean) / spec.num_std
            np.testing.assert_allclose(
                out["ehr_value"][j, lay.num][~np.isnan(num)], expect[~np.isnan(num)], rtol=1e-5
            )
            assert (codes[j, lay.cat] == arrays["static_cat"]).all()
    # masks only cover what exists
    assert not (out["ehr_ctx"] & ~valid).any() and not (out["ehr_tgt"] & ~valid).any()
    assert not out["img_ctx"][~out["has_image"]].any() and not out["img_tgt"][~out["has_image"]].any()
    assert (out["policy"] != NO_POLICY).all()


def test_eval_mode_keeps_the_stored_image(split, samples):
    cfg = load_config(overrides=["pipeline.image_size=64", "pipeline.patch_size=8"]).pipeline
    out = transform_batch(raw_batch(samples), split.spec, cfg, train=False, epoch=0)
    mean, std = cfg.normalize
    for j, key in enumerate(out["key"]):
        if not out["has_image"][j]:
            continue
        stored = np.load(io.BytesIO(samples[key]["image"]))[0].astype(np.float32) / 65535
        y0, x0, y1, x1 = json.loads(samples[key]["meta"])["image"]["valid_box"]
        got = out["image"][j, 0] * std + mean
        np.testing.assert_allclose(got[y0:y1, x0:x1], stored[y0:y1, x0:x1], atol=1e-5)


def test_train_mode_augments_and_is_deterministic_per_seed_epoch_and_key(split, samples):
    cfg = _cfg()
    batch = raw_batch(samples)
    a = transform_batch(batch, split.spec, cfg, train=True, epoch=3)
    b = transform_batch(batch, split.spec, cfg, train=True, epoch=3)
    for name in ("image", "img_ctx", "img_tgt", "ehr_tgt", "policy"):
        np.testing.assert_array_equal(a[name], b[name])
    # the same sample in another batch (order, neighbours) gets the same crop and masks
    keys = list(samples)[::-1][:5]
    c = transform_batch(raw_batch({k: samples[k] for k in keys}), split.spec, cfg, train=True, epoch=3)
    idx = [list(a["key"]).index(k) for k in keys]
    np.testing.assert_array_equal(c["image"], a["image"][idx])
    np.testing.assert_array_equal(c["img_tgt"], a["img_tgt"][idx])
    other = transform_batch(batch, split.spec, cfg, train=True, epoch=4)
    assert not np.array_equal(other["img_tgt"], a["img_tgt"])
    assert not np.array_equal(other["image"], a["image"])
    seeded = transform_batch(batch, split.spec, _cfg("pipeline.seed=1"), train=True, epoch=3)
    assert not np.array_equal(seeded["img_tgt"], a["img_tgt"])
    evaluated = transform_batch(batch, split.spec, cfg, train=False, epoch=3)
    assert not np.array_equal(evaluated["image"], a["image"])


def test_padding_stays_black_after_jitter(split, samples):
    cfg = _cfg("pipeline.brightness=0.5", "pipeline.crop_scale=[1.0, 1.0]", "pipeline.crop_aspect=[1.0, 1.0]")
    out = transform_batch(raw_batch(samples), split.spec, cfg, train=True, epoch=0)
    mean, std = cfg.normalize
    checked = 0
    for j, key in enumerate(out["key"]):
        if out["has_image"][j]:
            y0, x0, y1, x1 = json.loads(samples[key]["meta"])["image"]["valid_box"]
            img = out["image"][j, 0]
            outside = np.ones_like(img, bool)
            outside[y0:y1, x0:x1] = False
            if outside.any():
                assert np.allclose(img[outside], (0 - mean) / std)
                checked += 1
    assert checked > 0


def _corrupt(samples, key, **fields):
    bad = dict(samples)
    bad[key] = {**samples[key], **fields}
    return {k: v for k, v in bad.items() if v is not None}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"meta": None}, "no meta.json"),
        ({"meta": b"{not json"}, "not valid JSON"),
        ({"image": None}, "image.npy is missing"),
        ({"image": b"\x93NUMPY garbage"}, "image.npy does not decode"),
        ({"ehr": b"PK\x03\x04broken"}, "ehr.npz does not decode"),
    ],
)
def test_a_bad_sample_is_reported_by_shard_and_key_and_left_out(split, samples, change, reason):
    key = next(k for k, v in samples.items() if "image" in v and "ehr" in v)
    fields = {f: change.get(f, samples[key].get(f)) for f in ("image", "ehr", "meta")}
    batch = raw_batch({**samples, key: fields}, shard="train-000003.tar")
    bad = []
    out = transform_batch(batch, split.spec, _cfg(), train=True, epoch=0, on_bad=lambda *a: bad.append(a))
    assert len(bad) == 1 and bad[0][0] == "train-000003.tar" and bad[0][1] == key and reason in bad[0][2]
    assert key not in list(out["key"]) and len(out["key"]) == len(samples) - 1
    with pytest.raises(ShardError, match=f"train-000003.tar, sample {key}: .*{reason[:10]}"):
        transform_batch(batch, split.spec, _cfg(), train=True, epoch=0)


def test_npz_fast_path_matches_numpy_and_falls_back_for_compressed_archives():
    arrays = {
        "event_code": np.arange(7, dtype=np.int32),
        "event_value": np.array([1.5, np.nan], np.float32),
        "static_num": np.zeros(0, np.float32),
    }
    fast = decode_npz(encode_npz(arrays))
    assert fast.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(fast[k], arrays[k])
        assert fast[k].dtype == arrays[k].dtype
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    assert zipfile.ZipFile(io.BytesIO(buf.getvalue())).infolist()[0].compress_type != 0
    slow = decode_npz(buf.getvalue())
    for k in arrays:
        np.testing.assert_array_equal(slow[k], arrays[k])
