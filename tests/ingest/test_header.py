"""Tests for jepa_ray.ingest.header: files that are not readable DICOM, the allowlisted header and
study time, and PHI kept out of metadata, error details, logs and warnings."""

from __future__ import annotations

import json
import logging
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
from dicomkit import CFG, anatomy, expect_error, make_dataset, save
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.header import ALLOWED_KEYWORDS, read_header
from jepa_ray.ingest.image import read_image

# --- header -------------------------------------------------------------------------------------


def test_free_text_in_allowlisted_fields_never_passes(tmp_path):
    """Code-string and vendor fields keep only known terms: a name or MRN typed into them (16
    characters with spaces fit a CS) comes out as OTHER."""
    with pydicom.config.disable_value_validation():
        ds = make_dataset(
            anatomy(), ViewPosition="JOHN DOE 0042", BodyPartExamined="MRN 12345678", PatientSex="F"
        )
    ds.Modality = "SMITH"
    ds.Manufacturer = "Dr. Jane Roe, St. Elsewhere"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "JANE ROE"]
    ds.BurnedInAnnotation = "YES"
    safe = read_header(save(ds, tmp_path / "h.dcm")).safe
    assert safe["view"] == safe["body_part"] == safe["modality"] == safe["manufacturer"] == "OTHER"
    assert safe["image_type"] == ["ORIGINAL", "PRIMARY"] and safe["burned_in"] == "YES"
    text = json.dumps(safe)
    for planted in ("JOHN", "0042", "12345678", "SMITH", "Jane", "JANE", "Elsewhere"):
        assert planted not in text
    ds.Manufacturer, ds.ViewPosition, ds.BodyPartExamined = "GE MEDICAL SYSTEMS", "ap", " Chest "
    safe = read_header(save(ds, tmp_path / "h2.dcm")).safe
    assert (safe["manufacturer"], safe["view"], safe["body_part"]) == ("GE", "AP", "CHEST")


def test_header_fields_and_study_time(tmp_path):
    with pydicom.config.disable_value_validation():  # lower case is invalid CS, and normalised
        ds = make_dataset(anatomy(), ViewPosition="pa", BodyPartExamined="CHEST", PatientSex="F")
    ds.Manufacturer = "ACME Imaging"
    header = read_header(save(ds, tmp_path / "h.dcm"))
    assert header.study_time == datetime(2020, 1, 31, 10, 15, 30, 500000)
    assert header.patient_id == "P1" and header.study_uid == ds.StudyInstanceUID
    assert header.sop_uid == ds.SOPInstanceUID and header.institution is None
    safe = header.safe
    assert safe["view"] == "PA" and safe["body_part"] == "CHEST" and safe["sex"] == "F"
    assert safe["modality"] == "CT" and safe["bits_stored"] == 12 and safe["number_of_frames"] == 1
    assert safe["pixel_spacing_mm"] == [0.2, 0.2] and safe["manufacturer"] == "OTHER"  # not a known vendor
    assert safe["transfer_syntax"] == "Explicit VR Little Endian" and safe["sop_class"] == "CT Image Storage"
    assert json.loads(json.dumps(safe)) == safe
    assert len(ALLOWED_KEYWORDS) == len(safe)


@pytest.mark.parametrize(
    "dates,expected",
    [
        ({"StudyDate": "", "SeriesDate": "20190102", "SeriesTime": "0930"}, datetime(2019, 1, 2, 9, 30)),
        ({"StudyDate": "20190102", "StudyTime": "garbage"}, datetime(2019, 1, 2)),
        ({"StudyDate": "2019.01.02", "StudyTime": "09:30:15"}, datetime(2019, 1, 2, 9, 30, 15)),
        (
            {"StudyDate": "", "AcquisitionDateTime": "20190102093015.25+0100"},
            datetime(2019, 1, 2, 9, 30, 15, 250000),
        ),
        ({"StudyDate": "20191399"}, None),
    ],
)
def test_study_time_fallbacks(tmp_path, dates, expected):
    with pydicom.config.disable_value_validation():
        ds = make_dataset(None, **dates)
        if "StudyTime" not in dates:
            del ds.StudyTime
        path = save(ds, tmp_path / "d.dcm")
    assert read_header(path).study_time == expected


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [np.random.default_rng(0).bytes(4096), b"patient,value\n1,2\n" * 50, b"", b"\x00" * 132],
    ids=["random", "text", "empty", "zeros"],
)
def test_not_dicom(tmp_path, content):
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    expect_error(path, "not_dicom")
    expect_error(path, "not_dicom", fn=read_header)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.dcm", "unreadable_file")


@pytest.mark.parametrize("compress", [None, RLELossless])
def test_truncated_copy(tmp_path, compress):
    data = save(make_dataset(anatomy()), tmp_path / "full.dcm", compress=compress).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    expect_error(cut, "truncated")


# --- PHI ----------------------------------------------------------------------------------------

SECRETS = {
    "PatientName": "Zyxwvut^Qwertyx",
    "PatientID": "PID93A7XQ",
    "PatientBirthDate": "19420817",
    "InstitutionName": "Hospital Qx7Vbn",
    "AccessionNumber": "ACC778899",
    "ReferringPhysicianName": "Plmokn^Ijbuhv",
    "StudyDate": "19870605",
    "StudyTime": "112233",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.98765432123456789",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.55555444443333322222",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77777666665555544444",
}
BAD_NUMBER = "PHI4455X"  # patched into an IS element: pydicom's warning about it quotes it


def phi_dataset() -> Dataset:
    ds = make_dataset(anatomy(64, 64), **SECRETS, AcquisitionNumber="98765431")
    ds.file_meta.MediaStorageSOPInstanceUID = SECRETS["SOPInstanceUID"]
    return ds


def save_phi(ds: Dataset, path: Path) -> Path:
    """Write `ds`, then make its AcquisitionNumber an invalid IS that carries an identifier."""
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert data.count(b"98765431") == 1
    path.write_bytes(data.replace(b"98765431", BAD_NUMBER.encode()))
    return path


def assert_no_phi(text: str) -> None:
    for value in [*SECRETS.values(), BAD_NUMBER, "Zyxwvut", "Qwertyx", "Plmokn"]:
        assert value not in text, f"{value!r} leaked"


def corrupt_rle(ds: Dataset) -> None:
    """Replace the pixels by one RLE frame whose two segments stop after 16 bytes."""
    ds.compress(RLELossless, generate_instance_uid=False)
    header = b"".join(n.to_bytes(4, "little") for n in (2, 64, 80)) + bytes(52)
    ds.PixelData = encapsulate([header + b"\x7f" + b"\x01" * 15 + b"\x7f" + b"\x02" * 15])


def test_phi_never_in_safe_meta_errors_or_logs(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    shown = warnings.catch_warnings(record=True)
    caught = shown.__enter__()
    warnings.simplefilter("always")
    path = tmp_path / "phi.dcm"
    save_phi(phi_dataset(), path)
    header, _, meta = read_image(path, CFG)
    assert header.patient_id == SECRETS["PatientID"] and header.institution == SECRETS["InstitutionName"]
    assert header.study_time == datetime(1987, 6, 5, 11, 22, 33)
    for text in (repr(header.safe), json.dumps(header.safe), json.dumps(meta)):
        assert_no_phi(text)

    broken = []
    ds = phi_dataset()
    corrupt_rle(ds)
    broken.append(("rle", ds, "decode_failed"))
    ds = phi_dataset()
    ds.add_new("NumberOfFrames", "LO", "2x")  # written as LO: IS would refuse the value
    broken.append(("frames", ds, "bad_geometry"))
    ds = phi_dataset()
    ds.PhotometricInterpretation = SECRETS["PatientID"]
    broken.append(("photometric", ds, "unsupported_photometric"))
    for name, ds, reason in broken:
        bad = tmp_path / f"{name}.dcm"
        err = expect_error(save_phi(ds, bad), reason)
        assert_no_phi(str(err))
    data = path.read_bytes()
    for frac in (0.3, 0.6, 0.9):
        cut = tmp_path / f"cut{frac}.dcm"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(InvalidDicomError) as info:
            read_image(cut, CFG)
        assert_no_phi(str(info.value))
    shown.__exit__(None, None, None)
    out, err = capfd.readouterr()
    assert_no_phi(caplog.text + out + err + " ".join(str(w.message) for w in caught))
