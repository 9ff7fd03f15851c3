"""The synthetic cohort: real file formats, pairing, latent structure, PHI ground truth, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000Lossless, RLELossless

from jepa_ray.config import SynthConfig
from jepa_ray.synth.cohort import write_cohort

CFG = SynthConfig(subjects=40, seed=7)
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return out, write_cohort(out, CFG)


@pytest.fixture(scope="module")
def dicoms(cohort: tuple[Path, dict]) -> list[tuple[Path, pydicom.Dataset]]:
    out, _ = cohort
    return [(p, pydicom.dcmread(p)) for p in sorted((out / "dicom").rglob("*.dcm"))]


@pytest.fixture(scope="module")
def events(cohort: tuple[Path, dict]) -> pd.DataFrame:
    return pq.read_table(cohort[0] / "meds/data").to_pandas()


@pytest.fixture(scope="module")
def latents(cohort: tuple[Path, dict]) -> pd.DataFrame:
    return pq.read_table(cohort[0] / "latents.parquet").to_pandas().set_index("subject_id")


def _corrected(ds: pydicom.Dataset) -> np.ndarray:
    """Pixels as floats where brighter means more attenuation, whatever the photometric interpretation."""
    a = ds.pixel_array.astype(np.float64)
    return (2**ds.BitsStored - 1) - a if ds.PhotometricInterpretation == "MONOCHROME1" else a


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_summary_counts_match_files(cohort, dicoms, events):
    _, summary = cohort
    assert summary["subjects"] == CFG.subjects
    assert summary["images"] == summary["studies"] == len(dicoms) > CFG.subjects // 2
    assert summary["events"] == len(events)
    assert summary["image_only"] + summary["ehr_only"] + summary["both"] == CFG.subjects
    assert summary["seconds"] > 0


def test_tables_have_the_stated_columns_and_types(cohort):
    out, _ = cohort
    static = pq.read_schema(out / "static.parquet")
    assert static.names == ["subject_id", "age", "sex", "bmi", "smoking"]
    assert [static.field(n).type for n in static.names] == [
        pa.int64(),
        pa.float64(),
        pa.string(),
        pa.float64(),
        pa.string(),
    ]
    outcomes = pq.read_schema(out / "outcomes.parquet")
    assert outcomes.names == [
        "subject_id",
        "index_time",
        "cardiomegaly",
        "abnormal_lung",
        "death_time",
        "death_event",
    ]
    ts = pa.timestamp("us")
    assert [outcomes.field(n).type for n in outcomes.names] == [
        pa.int64(),
        ts,
        pa.bool_(),
        pa.bool_(),
        ts,
        pa.bool_(),
    ]
    lat = pq.read_schema(out / "latents.parquet")
    assert lat.names == ["subject_id", "cardiac", "lung", "frailty", "mass", "site", "has_image", "has_ehr"]
    assert lat.field("site").type == pa.int64() and lat.field("has_ehr").type == pa.bool_()

    st = pq.read_table(out / "static.parquet").to_pandas()
    assert set(st["sex"]) <= {"F", "M"}
    assert set(st["smoking"].dropna()) <= {"never", "former", "current"}
    assert st["age"].dropna().between(18, 100).all()
    o = pq.read_table(out / "outcomes.parquet").to_pandas()
    assert (o["death_time"] > o["index_time"]).all()
    assert o["index_time"].dt.year.between(2017, 2020).all()


def test_meds_files_follow_the_meds_schema(cohort, events):
    out, _ = cohort
    files = sorted((out / "meds/data").glob("*.parquet"))
    assert files
    seen: set[int] = set()
    for f in files:
        table = pq.read_table(f)
        assert table.schema.names == ["subject_id", "time", "code", "numeric_value"]
        assert table.schema.field("subject_id").type == pa.int64()
        assert table.schema.field("time").type == pa.timestamp("us")
        assert table.schema.field("code").type == pa.string()
        assert table.schema.field("numeric_value").type == pa.float32()
        meds.DataSchema.validate(table)
        df = table.to_pandas()
        subjects = set(df["subject_id"])
        assert not subjects & seen, "a subject is split across MEDS files"
        seen |= subjects
        # sorted by subject, then time with the static (null-time) rows first
        key = df["time"].astype("int64").where(df["time"].notna(), np.iinfo(np.int64).min)
        assert df["subject_id"].is_monotonic_increasing
        for _, g in key.groupby(df["subject_id"]):
            assert g.is_monotonic_increasing
    codes = pq.read_table(out / "meds/metadata/codes.parquet")
    meds.CodeMetadataSchema.validate(codes)
    assert set(events["code"]) <= set(codes.column("code").to_pylist())
    metadata = json.loads((out / "meds/metadata/dataset.json").read_text())
    meds.DatasetMetadataSchema.validate(metadata)
    assert {"dataset_name", "dataset_version", "etl_name", "meds_version"} <= set(metadata)


def test_meds_events_are_realistic(cohort, events):
    out, _ = cohort
    static = pq.read_table(out / "static.parquet").to_pandas().set_index("subject_id")
    for sid, g in events.groupby("subject_id"):
        assert (g["code"] == "MEDS_BIRTH").sum() == 1
        gender = g[g["code"].str.startswith("GENDER//")]
        assert len(gender) == 1 and gender["time"].isna().all()
        assert gender["code"].iloc[0] == f"GENDER//{static.loc[sid, 'sex']}"
        assert 10 <= len(g) <= 200
    timed = events[events["time"].notna() & (events["code"] != "MEDS_BIRTH")]
    assert timed["time"].dt.year.between(2014, 2022).all()
    assert events[events["code"] == "MEDS_BIRTH"]["time"].dt.year.between(1915, 2005).all()
    labs = events[events["code"].str.startswith(("LAB//", "VITAL//"))]
    assert labs["numeric_value"].notna().all() and (labs["numeric_value"] > 0).all()
    assert events[events["code"].str.startswith(("ICD10//", "RX//", "VISIT//"))]["numeric_value"].isna().all()
    # events fall both before and after the index (first study) time
    o = pq.read_table(out / "outcomes.parquet").to_pandas().set_index("subject_id")
    rel = timed["time"].to_numpy() - o.loc[timed["subject_id"], "index_time"].to_numpy()
    assert (rel < np.timedelta64(0)).mean() > 0.3 and (rel > np.timedelta64(0)).mean() > 0.2
    # nothing is recorded after death
    dead = o[o["death_event"]]
    last = timed.groupby("subject_id")["time"].max()
    common = last.index.intersection(dead.index)
    assert len(common) > 0 and (last[common] <= dead.loc[common, "death_time"]).all()


def test_every_dicom_file_decodes(cohort, dicoms):
    _, summary = cohort
    syntaxes = set()
    for path, ds in dicoms:
        raw = path.read_bytes()
        assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
        assert ds.SOPClassUID in (CR_STORAGE, DX_STORAGE)
        assert ds.Modality == ("DX" if ds.SOPClassUID == DX_STORAGE else "CR")
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0 and ds.HighBit == ds.BitsStored - 1
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns)
        assert int(arr.max()) < 2**ds.BitsStored and arr.std() > 0
        assert CFG.min_size <= ds.Rows <= CFG.max_size and CFG.min_size <= ds.Columns <= CFG.max_size
        assert 0.79 <= ds.Columns / ds.Rows <= 1.26
        assert "ImagerPixelSpacing" in ds or "PixelSpacing" in ds
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
    compressed = [ds for _, ds in dicoms if ds.file_meta.TransferSyntaxUID.is_compressed]
    assert len(compressed) == summary["compressed_images"] == round(CFG.compressed_fraction * len(dicoms))
    rle = [ds for ds in compressed if ds.file_meta.TransferSyntaxUID == RLELossless]
    assert rle, "no RLE Lossless image although compressed_fraction > 0"
    assert rle[0].pixel_array.shape == (rle[0].Rows, rle[0].Columns)
    if get_encoder(JPEG2000Lossless).is_available:
        assert JPEG2000Lossless in syntaxes


def test_headers_vary_like_a_real_archive(dicoms):
    headers = [ds for _, ds in dicoms]
    assert {ds.PhotometricInterpretation for ds in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({ds.BitsStored for ds in headers}) > 1
    assert {ds.Modality for ds in headers} == {"CR", "DX"}
    with_rescale = sum("RescaleSlope" in ds for ds in headers)
    with_window = sum("WindowCenter" in ds for ds in headers)
    assert 0 < with_rescale < len(headers) and 0 < with_window < len(headers)
    assert any(
        float(ds.RescaleSlope) != 1 or float(ds.RescaleIntercept) != 0
        for ds in headers
        if "RescaleSlope" in ds
    )
    assert len({(ds.Rows, ds.Columns) for ds in headers}) > len(headers) // 2


def test_pairing_fractions(cohort, dicoms, events, latents):
    out, _ = cohort
    imaged = {int(ds.PatientID) for _, ds in dicoms}
    with_events = set(events["subject_id"])
    static = set(pq.read_table(out / "static.parquet").column("subject_id").to_pylist())
    image_only = set(latents.index[latents["has_image"] & ~latents["has_ehr"]])
    ehr_only = set(latents.index[~latents["has_image"] & latents["has_ehr"]])
    assert len(image_only) == round(CFG.subjects * CFG.image_only_fraction)
    assert len(ehr_only) == round(CFG.subjects * CFG.ehr_only_fraction)
    assert imaged == set(latents.index[latents["has_image"]])
    assert with_events == static == set(latents.index[latents["has_ehr"]])
    assert not image_only & with_events and not ehr_only & imaged
    outcomes = pq.read_table(out / "outcomes.parquet").column("subject_id").to_pylist()
    assert sorted(outcomes) == sorted(latents.index)
    assert all(1_000_000_000 <= s <= 9_999_999_999 for s in latents.index)


def test_sites_differ_in_intensity(dicoms, latents):
    means: dict[int, list[float]] = {}
    for _, ds in dicoms:
        site = int(latents.loc[int(ds.PatientID), "site"])
        means.setdefault(site, []).append(_corrected(ds).mean() / (2**ds.BitsStored - 1))
    assert len(means) == CFG.sites
    site_means = sorted(np.mean(v) for v in means.values())
    assert site_means[-1] - site_means[0] > 0.05
    institutions = {}
    for _, ds in dicoms:
        institutions.setdefault(int(latents.loc[int(ds.PatientID), "site"]), set()).add(
            str(ds.InstitutionName)
        )
    assert (
        all(len(v) == 1 for v in institutions.values())
        and len(set().union(*institutions.values())) == CFG.sites
    )


def test_phantom_follows_latents(dicoms, latents):
    # regions in mm (y from the top edge, x from the centre, + towards the patient's left) through the
    # pixel spacing; intensities relative to the same image's lungs, mediastinum and darkest pixels,
    # then standardised within each site, whose detector responses differ on purpose
    rows = []
    for _, ds in dicoms:
        a = _corrected(ds)
        sp, w = float(ds.ImagerPixelSpacing[0]), a.shape[1]

        def region(y0: float, y1: float, x0: float, x1: float, a=a, sp=sp, w=w) -> np.ndarray:
            return a[int(y0 / sp) : int(y1 / sp), int(w / 2 + x0 / sp) : int(w / 2 + x1 / sp)].ravel()

        upper_lungs = np.concatenate([region(90, 190, -120, -60), region(90, 190, 60, 120)]).mean()
        lungs = np.concatenate([region(100, 230, -120, -50), region(100, 230, 50, 120)]).mean()
        mediastinum = region(110, 190, -8, 8).mean()
        beside_heart = region(200, 260, 50, 100).mean()
        darkest = np.percentile(a, 1)
        subject = latents.loc[int(ds.PatientID)]
        rows.append(
            {
                "site": subject["site"],
                "heart": (beside_heart - upper_lungs) / (mediastinum - upper_lungs),
                "lung_opacity": (lungs - darkest) / (mediastinum - darkest),
                "cardiac": subject["cardiac"],
                "lung": subject["lung"],
            }
        )
    df = pd.DataFrame(rows)
    for col in ("heart", "lung_opacity"):
        df[col] = df.groupby("site")[col].transform(lambda v: (v - v.mean()) / v.std())
    assert df["heart"].corr(df["cardiac"]) > 0.35
    assert df["lung_opacity"].corr(df["lung"]) > 0.35


def test_labs_follow_latents(events, latents):
    def subject_mean(code: str) -> pd.Series:
        return events[events["code"] == code].groupby("subject_id")["numeric_value"].mean()

    # the mass is an imaging finding: no measurement and no code of the EHR follows it
    for code in ("LAB//BNP", "LAB//CRP", "LAB//HGB", "VITAL//SPO2", "VITAL//HR"):
        values = subject_mean(code)
        assert abs(np.corrcoef(values, latents.loc[values.index, "mass"])[0, 1]) < 0.35, code
    coded = events.groupby("subject_id").size()
    assert abs(np.corrcoef(coded, latents.loc[coded.index, "mass"])[0, 1]) < 0.35

    bnp = subject_mean("LAB//BNP")
    assert np.corrcoef(np.log(bnp), latents.loc[bnp.index, "cardiac"])[0, 1] > 0.5
    spo2 = subject_mean("VITAL//SPO2")
    assert np.corrcoef(spo2, latents.loc[spo2.index, "lung"])[0, 1] < -0.5
    hgb = subject_mean("LAB//HGB")
    assert np.corrcoef(hgb, latents.loc[hgb.index, "frailty"])[0, 1] < -0.3
    hf = set(events.loc[events["code"] == "ICD10//I50", "subject_id"])
    with_ehr = latents[latents["has_ehr"]]
    assert (
        with_ehr.loc[with_ehr.index.isin(hf), "cardiac"].mean()
        > with_ehr.loc[~with_ehr.index.isin(hf), "cardiac"].mean()
    )


def _harrell(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's concordance: higher risk, earlier event."""
    pairs = concordant = 0
    for i in np.flatnonzero(event):
        later = time > time[i]
        pairs += later.sum()
        concordant += (risk[i] > risk[later]).sum()
    return concordant / pairs


def test_death_hazard_follows_latent_risk(cohort, latents):
    o = pq.read_table(cohort[0] / "outcomes.parquet").to_pandas().set_index("subject_id")
    lat = latents.loc[o.index]
    without_mass = (0.5 * lat["cardiac"] + 0.5 * lat["lung"] + 0.7 * lat["frailty"]).to_numpy()
    risk = without_mass + 0.6 * lat["mass"].to_numpy()
    time = (o["death_time"] - o["index_time"]).dt.total_seconds().to_numpy()
    event = o["death_event"].to_numpy()
    assert 0.1 < event.mean() < 0.8
    high = risk > np.median(risk)
    assert time[high].mean() < time[~high].mean() and event[high].mean() > event[~high].mean()
    assert _harrell(risk, time, event) > 0.6
    # the mass, which only the images show, carries hazard of its own
    assert _harrell(risk, time, event) > _harrell(without_mass, time, event) + 0.02
    labels = o[["cardiomegaly", "abnormal_lung"]].mean()
    assert labels.between(0.1, 0.55).all()
    assert latents.loc[o.index[o["cardiomegaly"]], "cardiac"].mean() > 0.5


def test_dicom_paths_carry_no_identifiers(cohort, dicoms, latents):
    out, _ = cohort
    planted = json.loads((out / "phi_planted.json").read_text())
    for path, _ in dicoms:
        rel = str(path.relative_to(out))
        assert not any(s in rel for s in planted), rel
        assert not any(str(sid) in rel for sid in latents.index), rel
        parts = path.relative_to(out / "dicom").parts
        assert (
            parts[0].startswith("site") and len(parts[1]) == 6 and parts[1].isdigit() and parts[2] == "1.dcm"
        )


def test_planted_phi_is_complete_and_present(cohort, dicoms):
    out, _ = cohort
    planted = json.loads((out / "phi_planted.json").read_text())
    assert isinstance(planted, list) and all(isinstance(s, str) and len(s) >= 6 for s in planted)
    blob = b"".join(p.read_bytes() for p, _ in dicoms)
    missing = [s for s in planted if s.encode() not in blob]
    assert not missing
    keywords = ["PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber"]
    keywords += [
        "ReferringPhysicianName",
        "StudyDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    ]
    for _, ds in dicoms:
        for kw in keywords:
            assert str(ds.data_element(kw).value) in planted, kw
    uids = {str(ds.SOPInstanceUID) for _, ds in dicoms} | {str(ds.StudyInstanceUID) for _, ds in dicoms}
    assert len(uids) == 2 * len(dicoms)


def test_same_seed_same_bytes_other_seed_differs(cohort, tmp_path):
    out, _ = cohort
    write_cohort(tmp_path / "again", CFG)
    first, again = _tree_hash(out), _tree_hash(tmp_path / "again")
    assert first == again
    write_cohort(tmp_path / "other", CFG.model_copy(update={"seed": CFG.seed + 1}))
    other = _tree_hash(tmp_path / "other")
    assert first["latents.parquet"] != other["latents.parquet"]
    dcm = {h for name, h in first.items() if name.endswith(".dcm")}
    assert dcm and not dcm & set(other.values())


def test_negative_seeds_are_distinct_cohorts(tmp_path):
    ids = []
    for seed in (-1, 1):
        write_cohort(tmp_path / str(seed), SynthConfig(subjects=3, seed=seed, min_size=64, max_size=64))
        ids.append(pq.read_table(tmp_path / str(seed) / "latents.parquet").column("subject_id").to_pylist())
    assert ids[0] != ids[1]


def test_worker_processes_write_the_same_bytes(tmp_path):
    cfg = SynthConfig(subjects=6, seed=3, min_size=64, max_size=96, compressed_fraction=0.5)
    write_cohort(tmp_path / "one", cfg, workers=1)
    write_cohort(tmp_path / "two", cfg, workers=2)
    assert _tree_hash(tmp_path / "one") == _tree_hash(tmp_path / "two")


@pytest.mark.parametrize(("image_only", "ehr_only"), [(1.0, 0.0), (0.0, 1.0)])
def test_single_modality_cohorts(tmp_path, image_only, ehr_only):
    cfg = SynthConfig(
        subjects=5,
        seed=1,
        image_only_fraction=image_only,
        ehr_only_fraction=ehr_only,
        min_size=64,
        max_size=64,
    )
    summary = write_cohort(tmp_path / "c", cfg)
    n_dcm = len(list((tmp_path / "c/dicom").rglob("*.dcm")))
    n_events = sum(pq.read_table(f).num_rows for f in (tmp_path / "c/meds/data").glob("*.parquet"))
    assert (n_dcm > 0, n_events > 0) == (image_only > 0, ehr_only > 0)
    assert summary["images"] == n_dcm and summary["events"] == n_events
    assert pq.read_table(tmp_path / "c/outcomes.parquet").num_rows == 5


def test_bad_config_and_occupied_output_are_rejected(cohort):
    with pytest.raises(ValidationError, match="image_only_fraction"):
        SynthConfig(image_only_fraction=0.7, ehr_only_fraction=0.5)
    with pytest.raises(ValidationError, match="min_size"):
        SynthConfig(min_size=512, max_size=256)
    with pytest.raises(FileExistsError, match="not empty"):
        write_cohort(cohort[0], CFG.model_copy(update={"seed": CFG.seed + 1}))


def test_rerun_with_the_same_config_is_a_no_op_and_another_config_is_refused(tmp_path):
    cfg = SynthConfig(subjects=6, seed=3, min_size=64, max_size=80)
    out = tmp_path / "c"
    first = write_cohort(out, cfg)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = write_cohort(out, cfg)
    assert again["images"] == first["images"] and "seconds" not in again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="not empty"):
        write_cohort(out, SynthConfig(subjects=7, seed=3, min_size=64, max_size=80))


def test_masks_are_written_beside_each_radiograph_and_follow_its_anatomy(cohort, dicoms, latents):
    """The ground-truth structure masks: one PNG per structure in the image's pixel grid, lung zones
    partitioning each lung, the heart's mask tracking the cardiac latent and the pixels the phantom
    drew (lungs dark, heart bright), listed in masks/structures.json."""
    from PIL import Image

    from jepa_ray.synth.phantom import STRUCTURES, mask_dir

    out, _ = cohort
    legend = json.loads((out / "masks" / "structures.json").read_text())
    assert set(legend["structures"]) == set(STRUCTURES) and "rows and columns" in legend["convention"]
    widths, centroids, cardiac = [], [], []
    for path, ds in dicoms:
        folder = out / mask_dir(str(path.relative_to(out)))
        m = {}
        for name in STRUCTURES:
            png = np.asarray(Image.open(folder / f"{name}.png"))
            assert png.shape == (ds.Rows, ds.Columns) and png.dtype == np.uint8
            assert set(np.unique(png)) <= {0, 255}
            m[name] = png == 255
        for side in ("right", "left"):
            zones = [m[f"{side}_{z}"] for z in ("upper", "middle", "lower")]
            assert (np.logical_or.reduce(zones) == m[f"{side}_lung"]).all() and sum(
                z.sum() for z in zones
            ) == m[f"{side}_lung"].sum()
            assert all(z.any() for z in zones)
        # the patient's right lung is on the image's left
        cols = np.arange(ds.Columns)
        assert (cols * m["right_lung"]).sum() / m["right_lung"].sum() < ds.Columns / 2
        assert (cols * m["left_lung"]).sum() / m["left_lung"].sum() > ds.Columns / 2
        a = _corrected(ds)
        lung_only = (m["right_lung"] | m["left_lung"]) & ~m["heart"] & ~m["bone"]
        assert a[lung_only].mean() < a[m["heart"] & ~m["bone"]].mean()
        sp = float(ds.ImagerPixelSpacing[1])
        heart_cols = np.flatnonzero(m["heart"].any(axis=0))
        thorax = (
            np.flatnonzero(m["left_lung"].any(axis=0))[-1] - np.flatnonzero(m["right_lung"].any(axis=0))[0]
        ) * sp
        widths.append((heart_cols[-1] - heart_cols[0]) * sp / thorax)
        centroids.append(((cols * m["heart"]).sum() / m["heart"].sum() - ds.Columns / 2) * sp / thorax)
        cardiac.append(latents.loc[int(ds.PatientID), "cardiac"])
    assert np.corrcoef(widths, cardiac)[0, 1] > 0.8  # the cardiothoracic ratio follows the latent
    assert np.corrcoef(centroids, cardiac)[0, 1] > 0.5  # a wider heart reaches further left


def test_masks_leave_the_images_unchanged(tmp_path):
    cfg = SynthConfig(subjects=4, seed=5, min_size=64, max_size=96)
    write_cohort(tmp_path / "with", cfg)
    write_cohort(tmp_path / "without", cfg.model_copy(update={"masks": False}))
    with_masks, without = _tree_hash(tmp_path / "with" / "dicom"), _tree_hash(tmp_path / "without" / "dicom")
    assert with_masks == without and with_masks
    assert not (tmp_path / "without" / "masks").exists()
    assert len(list((tmp_path / "with" / "masks").rglob("*.png"))) == len(with_masks) * 10


def test_a_mass_is_a_round_opacity_of_its_diameter_in_the_lung_it_names():
    from jepa_ray.synth.phantom import Mass, draw_chest

    kw = {"thorax": 148.0, "ap": False}
    plain = draw_chest((400, 400), 1.0, 0.0, 0.0, 0.0, rng=np.random.default_rng(3), **kw)
    for mass in (Mass(16.0, -1, 0.2, -0.2), Mass(40.0, 1, -0.1, 0.1)):
        drawn = draw_chest((400, 400), 1.0, 0.0, 0.0, 0.0, rng=np.random.default_rng(3), mass=mass, **kw)
        changed = np.abs(drawn - plain) > 0.05
        # the same image otherwise (the mass takes nothing from the random stream), denser where it is
        assert (drawn >= plain - 1e-6).all()
        assert 2 * np.sqrt(changed.sum() / np.pi) == pytest.approx(mass.diameter, rel=0.2)
        cols = np.flatnonzero(changed.any(axis=0))
        assert np.sign(cols.mean() - 200) == mass.side  # the patient's right lung is the image's left


def test_a_mass_adds_the_contrast_the_cohort_asks_for():
    """synth.mass_contrast is the attenuation the mass adds at its centre: the default 0.45 (soft
    tissue over lung), more for a more conspicuous finding; the rest of the image is unchanged."""
    from jepa_ray.synth.phantom import Mass, draw_chest

    kw = {"thorax": 148.0, "ap": False}
    plain = draw_chest((400, 400), 1.0, 0.0, 0.0, 0.0, rng=np.random.default_rng(3), **kw)
    added = {}
    for contrast in (0.45, 0.9):
        mass = Mass(40.0, 1, -0.1, 0.1, contrast)
        drawn = draw_chest((400, 400), 1.0, 0.0, 0.0, 0.0, rng=np.random.default_rng(3), mass=mass, **kw)
        added[contrast] = drawn - plain
        assert added[contrast].max() == pytest.approx(contrast, abs=1e-4)
    assert np.array_equal(added[0.45] > 1e-6, added[0.9] > 1e-6)  # the same place and size
    assert SynthConfig().mass_contrast == 0.45
    with pytest.raises(ValueError, match="mass_contrast"):
        SynthConfig(mass_contrast=0)
