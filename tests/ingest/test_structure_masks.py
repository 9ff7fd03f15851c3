"""`prepare --masks`: an annotation export's structure masks carried into the shards, aligned with
the stored images, for evaluation only; a bad mask costs that mask, never its image."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pandas as pd
import pytest

from jepa_ray.config import load_config
from jepa_ray.ingest.deid import Pseudonymizer
from jepa_ray.ingest.prepare import prepare
from jepa_ray.shards.format import decode_npz
from jepa_ray.synth.phantom import STRUCTURES


def _cfg():
    return load_config(
        overrides=["prepare.image.size=64", "prepare.shards.max_samples=16", "prepare.files_per_task=8"]
    ).prepare


def _samples(out) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def with_masks(ray_session, small_cohort, cohort_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("masked")
    result = prepare(str(out), _cfg(), **cohort_inputs(small_cohort), masks=str(small_cohort / "masks"))
    return out, result


def test_masks_land_in_the_shards_aligned_with_their_images(with_masks, small_cohort, cohort_inputs):
    out, result = with_masks
    assert result.ok, result.problems
    samples = _samples(out)
    imaged = {k: s for k, s in samples.items() if "image.npy" in s}
    assert imaged and all("mask.npz" in s for s in imaged.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s.get("masks", 0) for s in manifest["splits"].values()) == len(imaged)
    lat = pd.read_parquet(small_cohort / "latents.parquet")
    pz = Pseudonymizer(os.environ["JEPA_RAY_SALT"].encode())
    cardiac = {pz.subject(str(r.subject_id)): r.cardiac for r in lat.itertuples()}
    ratios, truth, darker = [], [], 0
    for s in imaged.values():
        meta = json.loads(s["meta.json"])
        assert meta["masks"] == sorted(STRUCTURES)
        planes = decode_npz(s["mask.npz"])["masks"]
        assert planes.shape == (len(STRUCTURES), 64, 64) and set(np.unique(planes)) <= {0, 1}
        m = dict(zip(meta["masks"], planes.astype(bool), strict=True))
        image = np.load(io.BytesIO(s["image.npy"]))[0].astype(float)
        y0, x0, y1, x1 = meta["image"]["valid_box"]
        assert not any(p[:y0].any() or p[y1:].any() or p[:, :x0].any() or p[:, x1:].any() for p in planes)
        lungs = (m["right_lung"] | m["left_lung"]) & ~m["heart"] & ~m["bone"]
        darker += image[lungs].mean() < image[m["heart"] & ~m["bone"]].mean()
        heart_cols = np.flatnonzero(m["heart"].any(axis=0))
        span = np.flatnonzero((m["right_lung"] | m["left_lung"]).any(axis=0))
        ratios.append((heart_cols[-1] - heart_cols[0] + 1) / (span[-1] - span[0] + 1))
        truth.append(cardiac[meta["subject"]])
    assert darker == len(imaged)  # the lungs the masks mark are the dark fields of the stored image
    assert np.corrcoef(ratios, truth)[0, 1] > 0.7  # the heart's mask follows the cardiac latent at 64 px
    # a rerun with the same masks writes nothing
    again = prepare(str(out), _cfg(), **cohort_inputs(small_cohort), masks=str(small_cohort / "masks"))
    assert again.written == 0


def test_a_bad_mask_is_quarantined_alone_and_an_unlisted_name_goes_nowhere(
    ray_session, small_cohort, cohort_inputs, tmp_path
):
    from PIL import Image

    masks = tmp_path / "masks"
    shutil.copytree(small_cohort / "masks", masks)
    folders = sorted(p.parent for p in masks.rglob("heart.png"))
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(folders[0] / "heart.png")  # not the image's size
    (folders[1] / "bone.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a corrupt file
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folders[2] / "quixote_dulcinea.png")  # not in the legend
    out = tmp_path / "shards"
    result = prepare(str(out), _cfg(), **cohort_inputs(small_cohort), masks=str(masks))
    manifest = json.loads((out / "manifest.json").read_text())
    records = [q for q in manifest["quarantine"]["items"] if q["kind"] == "mask"]
    assert sorted(q["reason"] for q in records) == ["mask_shape_mismatch", "mask_unreadable"]
    assert all(q["input"].endswith("(masks)") for q in records)
    samples = _samples(out)
    imaged = [s for s in samples.values() if "image.npy" in s]
    assert sum("mask.npz" in s for s in imaged) == len(imaged) - 2  # the two images are kept, maskless
    assert result.ok and manifest["counts"]["image"] == len(imaged)
    blob = b"".join(b for s in samples.values() for b in s.values()) + (out / "manifest.json").read_bytes()
    assert b"quixote" not in blob.lower()


def test_ct_masks_follow_the_volume_through_resampling_and_an_incomplete_series_keeps_its_volume(
    ray_session, ct_cohort, cohort_inputs, tmp_path
):
    """Per-slice CT masks are stacked in the series' spatial order (not file order) and resampled
    with the volume: lungs at the lung window's dark end, the heart's volume follows the cardiac
    latent; a series with a slice lacking masks loses its masks only."""
    from conftest import CT_VOLUME

    from jepa_ray.synth.ct_phantom import CT_STRUCTURES

    root = ct_cohort[0]
    masks = tmp_path / "masks"
    shutil.copytree(root / "masks", masks)
    # a CT series' folder holds one sub-folder per slice, without the radiographs' lung zones
    series = sorted(
        {p.parent.parent for p in masks.rglob("heart.png") if not (p.parent / "right_upper.png").exists()}
    )
    incomplete = series[0]
    shutil.rmtree(sorted(incomplete.iterdir())[3])  # one slice of one series unannotated
    cfg = load_config(overrides=[*CT_VOLUME, "prepare.image.size=64"]).prepare
    out = tmp_path / "shards"
    result = prepare(str(out), cfg, **cohort_inputs(root), masks=str(masks))
    assert result.ok, result.problems
    manifest = json.loads((out / "manifest.json").read_text())
    records = [q for q in manifest["quarantine"]["items"] if q["kind"] == "mask"]
    assert [q["reason"] for q in records] == ["mask_incomplete"]
    volumes = {
        k: s
        for k, s in _samples(out).items()
        if json.loads(s["meta.json"]).get("image", {}).get("kind") == "ct_volume"
    }
    assert len(volumes) >= 8
    assert sum("mask.npz" in s for s in volumes.values()) == len(volumes) - 1  # the incomplete one
    lat = pd.read_parquet(root / "latents.parquet")
    pz = Pseudonymizer(os.environ["JEPA_RAY_SALT"].encode())
    cardiac = {pz.subject(str(r.subject_id)): r.cardiac for r in lat.itertuples()}
    hearts, truth = [], []
    for s in volumes.values():
        if "mask.npz" not in s:
            continue
        meta = json.loads(s["meta.json"])
        assert meta["masks"] == sorted(CT_STRUCTURES)
        planes = decode_npz(s["mask.npz"])["masks"]
        assert planes.shape == (len(CT_STRUCTURES), 16, 40, 40) and set(np.unique(planes)) <= {0, 1}
        m = dict(zip(meta["masks"], planes.astype(bool), strict=True))
        lung_window = np.load(io.BytesIO(s["image.npy"]))[0].astype(float)  # (Z, Y, X) in [0, 1]
        lungs = (m["right_lung"] | m["left_lung"]) & ~m["heart"] & ~m["bone"]
        assert lungs.sum() > 50 and m["heart"].sum() > 20
        assert lung_window[lungs].mean() < 0.4 < lung_window[m["heart"] & ~m["bone"]].mean()
        # slices in spatial order: the lungs' extent is one run of slices, no holes from file order
        rows = np.flatnonzero((m["right_lung"] | m["left_lung"]).any(axis=(1, 2)))
        assert (np.diff(rows) == 1).all()
        hearts.append(m["heart"].sum())
        truth.append(cardiac[meta["subject"]])
    assert np.corrcoef(hearts, truth)[0, 1] > 0.5
