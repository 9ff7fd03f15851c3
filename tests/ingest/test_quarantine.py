"""Bad input is quarantined with its path and reason; the rest of the run goes on."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from hostilekit import deflate_bomb, rle_bomb
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.config import load_config
from jepa_ray.ingest.prepare import prepare


def _cfg(*extra: str):
    base = ["prepare.image.size=64", "prepare.shards.max_samples=32", "prepare.files_per_task=8"]
    base.append("prepare.deid.input_paths=relative")  # these tests find inputs by name
    return load_config(overrides=base + list(extra)).prepare


@pytest.fixture(scope="module")
def dirty_cohort(small_cohort, tmp_path_factory):
    """The small cohort plus one of each kind of bad input."""
    root = tmp_path_factory.mktemp("dirty")
    shutil.copytree(small_cohort, root, dirs_exist_ok=True)
    good = sorted((root / "dicom").rglob("*.dcm"))
    bad = root / "dicom" / "bad"
    bad.mkdir()
    raw = good[0].read_bytes()
    (bad / "truncated.dcm").write_bytes(raw[: int(len(raw) * 0.6)])
    (bad / "notes.txt").write_text("this is a radiology report, not an image\n")
    (bad / "empty.dcm").write_bytes(b"")
    ds = pydicom.dcmread(good[1])
    del ds.PixelData
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(bad / "nopixels.dcm")
    shutil.copy(get_testdata_file("SC_rgb_rle.dcm"), bad / "rgb.dcm")
    deflate_bomb(bad / "deflate_bomb.dcm", 300 * 2**20)  # ~300 KB on disk, 300 MiB inflated
    rle_bomb(bad / "rle_bomb.dcm")  # 3.8 MB on disk, 11000 x 11000 pixels
    # MEDS: a file of bad rows (string times) and a corrupt file
    subj = int(pd.read_parquet(root / "static.parquet").subject_id.iloc[0])
    rows = pa.table(
        {
            "subject_id": pa.array([subj, None, subj, subj, subj], pa.int64()),
            "time": pa.array(["2019-05-01 10:00", "2019-05-01", "not a date", "2019-05-02", "2019-05-03"]),
            "code": pa.array(["LAB//BNP", "LAB//BNP", "LAB//BNP", "LAB//CRP", None]),
            "numeric_value": pa.array([120.0, 1.0, 2.0, float("nan"), 3.0], pa.float32()),
        }
    )
    pq.write_table(rows, root / "meds" / "data" / "zz_bad_rows.parquet")
    (root / "meds" / "data" / "zz_corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    static = pd.read_parquet(root / "static.parquet")
    orphan = static.iloc[[0]].copy()
    orphan["subject_id"] = 4242
    pd.concat([static, orphan]).to_parquet(root / "static.parquet", index=False)
    outcomes = pd.read_parquet(root / "outcomes.parquet")
    orphan = outcomes.iloc[[0]].copy()
    orphan["subject_id"] = 4343
    pd.concat([outcomes, orphan]).to_parquet(root / "outcomes.parquet", index=False)
    return root


def test_each_bad_input_is_quarantined_with_its_reason(
    ray_session, dirty_cohort, small_cohort, tmp_path, cohort_inputs
):
    result = prepare(str(tmp_path / "out"), _cfg(), **cohort_inputs(dirty_cohort))
    m = result.manifest
    items = m["quarantine"]["items"]
    by_input = {q["input"]: q for q in items}
    assert by_input["bad/truncated.dcm"]["reason"] in ("truncated", "unreadable_header", "decode_failed")
    assert by_input["bad/notes.txt"]["reason"] == "not_dicom"
    assert by_input["bad/empty.dcm"]["reason"] in ("not_dicom", "truncated")
    assert by_input["bad/nopixels.dcm"]["reason"] == "no_pixel_data"
    assert by_input["bad/rgb.dcm"]["reason"] == "secondary_capture"  # before its colour is even looked at
    assert by_input["bad/deflate_bomb.dcm"]["reason"] == "over_limit"  # in the header scan
    assert by_input["bad/rle_bomb.dcm"]["reason"] == "over_limit"  # in its shard task, before decoding
    rows = {(q["input"], q["reason"]): q for q in items if q["kind"] == "ehr_rows"}
    assert rows[("data/zz_bad_rows.parquet", "missing_subject")]["rows"] == [1]
    assert rows[("data/zz_bad_rows.parquet", "unparsable_time")]["rows"] == [2]
    assert rows[("data/zz_bad_rows.parquet", "non_finite_value")]["rows"] == [3]
    assert rows[("data/zz_bad_rows.parquet", "missing_code")]["rows"] == [4]
    assert by_input["data/zz_corrupt.parquet"]["reason"] == "unreadable_parquet"
    n_static = len(pd.read_parquet(small_cohort / "static.parquet"))
    n_outcomes = len(pd.read_parquet(small_cohort / "outcomes.parquet"))
    static_q = next(q for q in items if q["kind"] == "static_rows")
    assert static_q["reason"] == "unknown_subject" and static_q["rows"] == [n_static]  # the appended row
    outcome_q = next(q for q in items if q["kind"] == "outcome_rows")
    assert outcome_q["reason"] == "unknown_subject" and outcome_q["rows"] == [n_outcomes]
    for q in items:
        assert q["detail"], q
    # nothing else is lost: every good study and subject is still there
    n_good = sum(1 for p in (small_cohort / "dicom").rglob("*") if p.is_file())
    assert m["counts"]["image"] == n_good
    assert result.ok  # 7 bad files of ~80 stay under the default 20% limit
    # the one good row of the bad-rows file was kept: its code counts in the vocabulary statistics
    assert m["ehr"]["event_rows"] >= 5


def test_too_much_quarantine_fails_with_a_summary(ray_session, dirty_cohort, tmp_path, cohort_inputs):
    args = ["prepare", "--out", str(tmp_path / "out")]
    for k, v in cohort_inputs(dirty_cohort).items():
        args += [f"--{k}", v]
    r = CliRunner().invoke(app, [*args, "prepare.image.size=64", "prepare.max_quarantine_fraction=0.01"])
    assert r.exit_code == 1, r.output
    assert "quarantined" in r.output and "not_dicom" in r.output
    assert (tmp_path / "out" / "manifest.json").exists()  # the usable part is still written


def test_nothing_usable_is_an_error(ray_session, tmp_path):
    d = tmp_path / "dicom"
    d.mkdir()
    (d / "a.dcm").write_bytes(b"garbage")
    result = prepare(str(tmp_path / "out"), _cfg(), dicom=str(d))
    assert not result.ok and any("no usable sample" in p for p in result.problems)


PYDICOM_FILES = [  # exact names shipped inside pydicom (other names would go to the network)
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "JPEG-lossy.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_rle.dcm",
    "rtdose.dcm",
    "MR_truncated.dcm",
    "badVR.dcm",
    "meta_missing_tsyntax.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "nested_priv_SQ.dcm",
    "rtplan.dcm",
    "liver_1frame.dcm",
    "no_meta.dcm",
]


def test_pydicom_test_files_decode_or_are_quarantined(ray_session, tmp_path):
    d = tmp_path / "dicom"
    d.mkdir()
    names = []
    for name in PYDICOM_FILES:
        shutil.copy(get_testdata_file(name), d / name)
        names.append(name)
    result = prepare(str(tmp_path / "out"), _cfg("prepare.max_quarantine_fraction=1.0"), dicom=str(d))
    m = result.manifest
    quarantined = {q["input"] for q in m["quarantine"]["items"]}
    skipped = {s["input"] for s in m["skipped"]}
    assert m["counts"]["image"] + len(quarantined) + len(skipped) == len(names)
    assert {"CT_small.dcm", "MR_small.dcm"} - quarantined == {"CT_small.dcm", "MR_small.dcm"}
    assert {"rtplan.dcm", "SC_rgb_rle.dcm", "rtdose.dcm", "no_meta.dcm"} <= quarantined
    # MR_small's study also holds MR_small_RLE, MR_truncated, ...: one image of it is used, the others
    # are recorded as left out (or quarantined when tried first and broken)
    assert "MR_truncated.dcm" in quarantined | skipped
    assert m["counts"]["image"] >= 3  # several files share one study (MR_small*)
    json.dumps(m)  # the manifest stays valid JSON whatever the input


def test_hashed_input_paths_keep_identifying_folder_names_out(ray_session, small_cohort, tmp_path):
    """PACS exports often name folders after the patient: the default (`deid.input_paths=hashed`)
    keeps them out."""
    d = tmp_path / "dicom" / "DOE^JOHN_MRN0042"
    d.mkdir(parents=True)
    shutil.copy(next((small_cohort / "dicom").rglob("*.dcm")), d / "good.dcm")
    (d / "broken.dcm").write_bytes(b"not a dicom file")
    outputs = {}
    for mode in ("relative", "default"):
        out = tmp_path / mode
        over = [f"prepare.deid.input_paths={mode}"] if mode == "relative" else []
        prepare(str(out), load_config(overrides=over).prepare, dicom=str(tmp_path / "dicom"))
        outputs[mode] = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
        m = json.loads((out / "manifest.json").read_text())
        assert m["quarantine"]["by_reason"] == {"not_dicom": 1} and m["counts"]["image"] == 1
    assert b"DOE^JOHN" in outputs["relative"]  # named, for a machine where names are not identifying
    assert b"DOE^JOHN" not in outputs["default"] and b"MRN0042" not in outputs["default"]
    assert b'"input":"path-' in outputs["default"]  # the default: a salted hash of the path


@pytest.mark.parametrize("policy", ["quarantine", "keep"])
def test_images_with_text_in_their_pixels_are_quarantined_by_default(
    policy, ray_session, small_cohort, tmp_path
):
    """BurnedInAnnotation=YES and secondary captures (screenshots, scanned forms) may show a name
    in the pixels, which no header scrubbing removes."""
    d = tmp_path / "dicom"
    d.mkdir()
    good = sorted((small_cohort / "dicom").rglob("*.dcm"))
    shutil.copy(good[0], d / "plain.dcm")
    burned = pydicom.dcmread(good[1])
    burned.BurnedInAnnotation = "YES"
    burned.save_as(d / "burned.dcm")
    capture = pydicom.dcmread(good[2])
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    capture.save_as(d / "capture.dcm")
    cfg = _cfg(
        f"prepare.deid.burned_in={policy}",
        f"prepare.deid.secondary_capture={policy}",
        "prepare.max_quarantine_fraction=1.0",
    )
    m = prepare(str(tmp_path / "out"), cfg, dicom=str(d)).manifest
    reasons = {q["input"]: q["reason"] for q in m["quarantine"]["items"]}
    if policy == "quarantine":
        assert reasons == {"burned.dcm": "burned_in_annotation", "capture.dcm": "secondary_capture"}
        assert m["counts"]["image"] == 1
    else:
        assert reasons == {} and m["counts"]["image"] == 3
