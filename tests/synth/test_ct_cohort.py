"""CT end to end through the data side: `synth` writes chest-CT series driven by the latents,
`prepare` (with prepare.volume.enabled) ingests each study's series as one windowed volume,
quarantines a broken series with its reason, skips CT when volumes are off; the pipeline's feature
spec tells a 2-D or a 3-D run what the shards hold."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import CT_VOLUME

from jepa_ray.config import load_config
from jepa_ray.errors import ConfigError
from jepa_ray.ingest.deid import Pseudonymizer
from jepa_ray.ingest.prepare import prepare
from jepa_ray.shards.format import decode_npy
from jepa_ray.stream.local import read_samples
from jepa_ray.stream.pipeline import open_split
from jepa_ray.synth.cohort import cohort_inputs

VOLUME = CT_VOLUME


def _series_dirs(root: Path) -> list[Path]:
    return sorted(d for d in (root / "dicom").glob("site*/*") if len(list(d.glob("*.dcm"))) > 1)


def test_synth_writes_ct_series_with_scanner_headers(ct_cohort):
    root, summary = ct_cohort
    dirs = _series_dirs(root)
    assert summary["ct_series"] == len(dirs) > 5 and summary["images"] > summary["ct_series"]
    files = sorted(dirs[0].glob("*.dcm"))
    assert len(files) == 14
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {h.Modality for h in headers} == {"CT"} and len({h.SeriesInstanceUID for h in headers}) == 1
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    steps = np.diff(sorted(z))
    assert np.allclose(steps, steps[0]) and steps[0] == pytest.approx(float(headers[0].SliceThickness))
    assert [float(h.ImagePositionPatient[2]) for h in headers] != sorted(z, reverse=True)  # names shuffled
    phi = set(json.loads((root / "phi_planted.json").read_text()))
    assert {h.SOPInstanceUID for h in headers} <= phi and str(headers[0].PatientName) in phi


def test_prepare_ingests_each_ct_series_as_one_volume(ct_cohort, ct_shards):
    root, summary = ct_cohort
    out = ct_shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["volume"] == summary["ct_series"]
    assert manifest["volume"]["channels"] == ["lung", "mediastinum"] and manifest["volume"]["size"] == [
        16,
        40,
        40,
    ]
    volumes, radiographs, mediastinum = [], 0, {}
    for shard in out.glob("*.tar"):
        for sample in read_samples(shard).values():
            if "image" not in sample:
                continue
            meta = json.loads(sample["meta"])
            image = decode_npy(sample["image"])
            if meta["image"].get("kind") == "ct_volume":
                assert image.shape == (2, 16, 40, 40) and image.dtype == np.float16
                assert image.min() >= 0 and image.max() <= 1 and meta["image"]["slices"] == 14
                assert meta["dicom"]["modality"] == "CT"
                volumes.append(image)
                mediastinum[meta["subject"]] = float(image[1, 6:12, 12:28, 12:28].astype(float).mean())
            else:
                radiographs += 1
                assert image.shape == (1, 64, 64)  # CHW radiographs
    assert len(volumes) == summary["ct_series"] and radiographs == summary["images"] - summary["ct_series"]
    # the heart (soft tissue in the mediastinum window) grows with the cardiac latent
    pz = Pseudonymizer(os.environ["JEPA_RAY_SALT"].encode())
    latents = pd.read_parquet(root / "latents.parquet")
    cardiac = {pz.subject(r.subject_id): r.cardiac for r in latents.itertuples()}
    subjects = sorted(mediastinum)
    rho = pd.Series([mediastinum[s] for s in subjects]).corr(
        pd.Series([cardiac[s] for s in subjects]), "spearman"
    )
    assert rho > 0.4, rho
    spec = open_split(str(out), "train").spec  # a mixed cohort: either kind can be trained on
    assert (
        spec.stored_volume == (16, 40, 40) and spec.volume_channels == 2 and spec.volumes and spec.images_2d
    )
    three = load_config(
        overrides=["pipeline.dims=3", "pipeline.volume_size=[8,32,32]", "pipeline.tubelet=[4,8,8]"]
    )
    dims = spec.model_dims(three.pipeline)
    assert dims["channels"] == 2 and dims["volume_size"] == [8, 32, 32] and dims["tubelet"] == [4, 8, 8]
    assert spec.model_dims(load_config().pipeline)["volume_size"] is None


def test_a_broken_series_is_quarantined_and_ct_is_skipped_when_volumes_are_off(
    ct_cohort, tmp_path, ray_session
):
    root, summary = ct_cohort
    copy = tmp_path / "cohort"
    shutil.copytree(root, copy)
    broken = _series_dirs(copy)[0]
    by_z = sorted(broken.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    by_z[6].unlink()  # a slice in the middle of the chest is missing
    out = tmp_path / "shards"
    named = [*VOLUME, "prepare.deid.input_paths=relative"]  # the record names the series' folder
    assert prepare(str(out), load_config(overrides=named).prepare, **cohort_inputs(copy)).ok
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["volume"] == summary["ct_series"] - 1
    [record] = [q for q in manifest["quarantine"]["items"] if q["reason"] == "series_gap"]
    assert record["count"] == 13 and "about 1 slice(s) missing" in record["detail"]
    assert record["input"].startswith(str(broken.relative_to(copy / "dicom")))
    # without volumes: no CT slice becomes a 2-D image; each is skipped with the reason and the switch
    out2 = tmp_path / "shards2"
    assert prepare(str(out2), load_config().prepare, **cohort_inputs(root)).ok
    manifest = json.loads((out2 / "manifest.json").read_text())
    skipped = [s for s in manifest["skipped"] if s["reason"] == "ct_series_not_ingested"]
    assert len(skipped) == 14 * summary["ct_series"] and "prepare.volume.enabled=true" in skipped[0]["detail"]
    assert manifest["counts"]["image"] == summary["images"] - summary["ct_series"]
    assert manifest["counts"]["volume"] == 0 and manifest["volume"] is None
    with pytest.raises(
        ConfigError, match=r"pipeline\.dims=3 trains on CT volumes, but these shards hold only 2-D"
    ):
        open_split(str(out2), "train").spec.model_dims(load_config(overrides=["pipeline.dims=3"]).pipeline)


def test_ct_series_write_per_slice_masks_that_follow_the_anatomy(tmp_path):
    """Each CT slice gets its structures' masks beside its own path: lungs at air-like HU, the heart
    at soft tissue, and the heart's volume growing with the cardiac latent."""
    import json

    import numpy as np
    import pandas as pd
    import pydicom
    from PIL import Image

    from jepa_ray.config import SynthConfig
    from jepa_ray.synth.cohort import write_cohort
    from jepa_ray.synth.ct_phantom import CT_STRUCTURES
    from jepa_ray.synth.phantom import mask_dir

    out = tmp_path / "ct"
    write_cohort(
        out,
        SynthConfig(subjects=12, seed=4, ct_fraction=1.0, ct_size=48, ct_slices=12, min_size=64, max_size=64),
    )
    assert set(json.loads((out / "masks" / "structures.json").read_text())["ct_structures"]) == set(
        CT_STRUCTURES
    )
    latents = pd.read_parquet(out / "latents.parquet").set_index("subject_id")
    volumes, cardiac = {}, {}
    for path in sorted((out / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        folder = out / mask_dir(str(path.relative_to(out)))
        m = {n: np.asarray(Image.open(folder / f"{n}.png")) == 255 for n in CT_STRUCTURES}
        assert all(v.shape == hu.shape for v in m.values())
        lungs = m["right_lung"] | m["left_lung"]
        if lungs.sum() > 20 and m["heart"].sum() > 20:
            assert np.median(hu[lungs]) < -500 < np.median(hu[m["heart"]])
        cols = np.arange(hu.shape[1])
        if m["right_lung"].any() and m["left_lung"].any():  # LPS: the patient's right on the image's left
            assert (cols * m["right_lung"]).sum() / m["right_lung"].sum() < (cols * m["left_lung"]).sum() / m[
                "left_lung"
            ].sum()
        series = str(path.parent)
        volumes[series] = volumes.get(series, 0) + int(m["heart"].sum())
        cardiac[series] = latents.loc[int(ds.PatientID), "cardiac"]
    series = sorted(volumes)
    assert len(series) >= 8
    assert np.corrcoef([volumes[s] for s in series], [cardiac[s] for s in series])[0, 1] > 0.6
