"""Tests for jepa_ray.ingest.dicom: decoding, intensity pipeline, geometry, failure reasons, PHI."""

from __future__ import annotations

import json
import logging
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    RLELossless,
    generate_uid,
)

from jepa_ray.config import ImageConfig
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.dicom import ALLOWED_KEYWORDS, _j2k_level, read_header, read_image

CFG = ImageConfig()
REASONS = {
    "unreadable_file",
    "not_dicom",
    "truncated",
    "unreadable_header",
    "no_pixel_data",
    "bad_geometry",
    "multi_frame",
    "unsupported_photometric",
    "decode_failed",
    "empty_image",
}


def anatomy(rows: int = 128, cols: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth 12-bit 'body' (bright disc on a dark background) with noise."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    r = np.hypot((yy - rows / 2) / rows, (xx - cols / 2) / cols)
    img = (
        300
        + 3000 * (r < 0.3)
        + 500 * np.sin(yy / 7.0)
        + np.random.default_rng(seed).normal(0, 20, (rows, cols))
    )
    return img.clip(0, 4095).astype(np.uint16)


def make_dataset(pixels: np.ndarray | None = None, **attrs) -> Dataset:
    """A minimal single-frame CT dataset with file meta; `attrs` override or add elements."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20200131", "101530.5"
    if pixels is not None:
        signed = pixels.dtype.kind == "i"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = 12 if pixels.dtype == np.uint16 else ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(signed)
        ds.PixelSpacing = [0.2, 0.2]
        ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path, compress: str | None = None) -> Path:
    if compress:
        ds.compress(compress, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def expect_error(path: Path, reason: str, fn=read_image) -> InvalidDicomError:
    with pytest.raises(InvalidDicomError) as info:
        fn(path, CFG) if fn is read_image else fn(path)
    assert info.value.reason == reason, info.value
    assert str(path) in str(info.value)
    return info.value


# --- image pipeline -----------------------------------------------------------------------------


def test_output_dtype_shape_range_and_meta(tmp_path):
    path = save(make_dataset(anatomy(512, 512)), tmp_path / "a.dcm")
    header, image, meta = read_image(path, CFG)
    assert image.dtype == np.uint16 and image.shape == (1, 224, 224)
    assert image.min() == 0 and image.max() > 0.95 * 65535  # antialiasing averages the extremes
    assert meta["orig_shape"] == [512, 512] and meta["valid_box"] == [0, 0, 224, 224]
    assert meta["spacing_in_mm"] == [0.2, 0.2]
    assert meta["spacing_out_mm"] == pytest.approx([0.2 * 512 / 224] * 2)
    assert meta["voi_applied"] is False and meta["inverted"] is False
    lo, hi = meta["intensity_range"]
    assert 0 <= lo < 600 and 3000 < hi <= 4095
    centre = image[0, 100:124, 100:124].mean()
    assert centre > 0.6 * 65535  # the bright disc stays bright
    json.dumps(meta)
    assert header.safe["rows"] == 512 and header.safe["photometric"] == "MONOCHROME2"


@pytest.mark.parametrize("extra", [{}, {"PresentationLUTShape": "IDENTITY"}])
def test_monochrome1_matches_monochrome2(tmp_path, extra):
    a = anatomy()
    _, img2, meta2 = read_image(save(make_dataset(a), tmp_path / "m2.dcm"), CFG)
    mono1 = make_dataset(4095 - a, PhotometricInterpretation="MONOCHROME1", **extra)
    _, img1, meta1 = read_image(save(mono1, tmp_path / "m1.dcm"), CFG)
    assert meta1["inverted"] is True and meta2["inverted"] is False
    assert np.abs(img1.astype(int) - img2.astype(int)).max() <= 1


def test_monochrome2_with_inverse_presentation_lut_is_inverted(tmp_path):
    a = anatomy()
    _, img2, _ = read_image(save(make_dataset(a), tmp_path / "m2.dcm"), CFG)
    inv = make_dataset(4095 - a, PresentationLUTShape="INVERSE")
    _, img, meta = read_image(save(inv, tmp_path / "inv.dcm"), CFG)
    assert meta["inverted"] is True
    assert np.abs(img.astype(int) - img2.astype(int)).max() <= 1


def test_rescale_slope_intercept_applied(tmp_path):
    a = anatomy()
    _, raw, raw_meta = read_image(save(make_dataset(a), tmp_path / "raw.dcm"), CFG)
    scaled = make_dataset(a, RescaleSlope=2, RescaleIntercept=-1000)
    _, img, meta = read_image(save(scaled, tmp_path / "scaled.dcm"), CFG)
    assert np.abs(img.astype(int) - raw.astype(int)).max() <= 1
    lo, hi = raw_meta["intensity_range"]
    assert meta["intensity_range"] == pytest.approx([2 * lo - 1000, 2 * hi - 1000], abs=1e-3)
    # A negative slope flips the intensities: the stored bright disc is dark in modality units.
    flipped = make_dataset(a, RescaleSlope=-1, RescaleIntercept=0)
    _, img_neg, _ = read_image(save(flipped, tmp_path / "neg.dcm"), CFG)
    assert np.abs(img_neg.astype(int) - (65535 - raw.astype(int))).max() <= 1


def test_signed_ct_hounsfield(tmp_path):
    hu = (anatomy().astype(np.int16) - 1024).astype(np.int16)
    ds = make_dataset(hu, RescaleSlope=1, RescaleIntercept=0)
    _, img, meta = read_image(save(ds, tmp_path / "ct.dcm"), CFG)
    assert meta["intensity_range"][0] < -500 and img.max() > 0.95 * 65535


def test_aspect_kept_and_padding_zero(tmp_path):
    path = save(make_dataset(anatomy(100, 200)), tmp_path / "wide.dcm")
    _, image, meta = read_image(path, CFG)
    y0, x0, y1, x1 = meta["valid_box"]
    assert (y1 - y0, x1 - x0) == (112, 224) and (y0, x0) == (56, 0)
    assert image[0, :y0].max() == 0 and image[0, y1:].max() == 0
    assert image[0, y0 + 50 : y0 + 62, 100:124].min() > 0.6 * 65535  # the disc, in the middle of the box
    assert meta["spacing_out_mm"] == pytest.approx([0.2 * 100 / 112, 0.2 * 200 / 224])


def test_tall_image_and_other_size(tmp_path):
    path = save(make_dataset(anatomy(300, 60)), tmp_path / "tall.dcm")
    _, image, meta = read_image(path, ImageConfig(size=64))
    assert image.shape == (1, 64, 64)
    assert meta["valid_box"] == [0, 25, 64, 38]  # 60 * 64 / 300 = 12.8 -> 13 columns, centred
    assert image[0, :, :25].max() == 0 and image[0, :, 38:].max() == 0 and image[0, :, 25:38].max() > 0


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_twin_decodes_identically(tmp_path, syntax):
    assert get_encoder(syntax).is_available, f"no encoder for {syntax.name}: pylibjpeg plugins missing"
    a = anatomy(200, 160)
    _, plain, _ = read_image(save(make_dataset(a), tmp_path / "plain.dcm"), CFG)
    header, packed, _ = read_image(save(make_dataset(a), tmp_path / "packed.dcm", compress=syntax), CFG)
    assert header.safe["transfer_syntax"] == syntax.name
    assert np.array_equal(plain, packed)


@pytest.mark.parametrize("bits", [12, 8])
def test_jpeg2000_decodes_at_the_resolution_the_shard_needs(tmp_path, bits):
    a = anatomy(1000, 800) if bits == 12 else (anatomy(1000, 800) // 16).astype(np.uint8)
    packed = save(make_dataset(a), tmp_path / "j2k.dcm", compress=JPEG2000Lossless)
    _, full, meta_full = read_image(packed, ImageConfig(j2k_reduce=False))
    _, fast, meta = read_image(packed, CFG)
    assert meta_full["j2k_reduction"] == 0
    assert meta["j2k_reduction"] == 2  # 1000 / 4 = 250 rows still >= 224; 1000 / 8 would not be
    assert (
        meta["valid_box"] == meta_full["valid_box"] and meta["spacing_out_mm"] == meta_full["spacing_out_mm"]
    )
    # 12 bits stored: Pillow returns them scaled to 16, which must be undone (8 bits: its own mode)
    assert meta["intensity_range"] == pytest.approx(meta_full["intensity_range"], rel=0.02, abs=1)
    x, y = full[0] / 65535, fast[0] / 65535
    assert np.abs(x - y).mean() < 0.005  # measured 0.0025; without the low-pass phase shift 0.014
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.999


def test_jpeg2000_level_is_one_the_decoder_can_size():
    assert _j2k_level(1000, 800, 224, 5) == 2
    assert _j2k_level(1000, 800, 224, 1) == 1  # a stream with one decomposition level
    assert _j2k_level(400, 400, 224, 5) == 0
    # 1001 / 4: openjpeg makes ceil = 251 columns, Pillow's buffer rounds to 250 -> level 1 instead
    assert _j2k_level(998, 1001, 224, 5) == 1


def test_jpeg2000_reduced_decode_falls_back_to_full(tmp_path, monkeypatch):
    a = anatomy(998, 1001)
    packed = save(make_dataset(a), tmp_path / "j2k.dcm", compress=JPEG2000Lossless)
    _, odd, meta = read_image(packed, CFG)
    assert meta["j2k_reduction"] == 1 and odd.shape == (1, 224, 224)
    signed = save(make_dataset(a.astype(np.int16) - 2000), tmp_path / "s.dcm", compress=JPEG2000Lossless)
    assert read_image(signed, CFG)[2]["j2k_reduction"] == 0  # Pillow has no signed 16-bit mode
    _, full, _ = read_image(packed, ImageConfig(j2k_reduce=False))

    def broken(*args, **kwargs):
        raise OSError("broken data stream when reading image file")

    monkeypatch.setattr("PIL.Image.open", broken)
    _, again, meta = read_image(packed, CFG)
    assert meta["j2k_reduction"] == 0 and np.array_equal(again, full)


# --- VOI ----------------------------------------------------------------------------------------


def gradient() -> np.ndarray:
    return np.tile(np.linspace(0, 4000, 200), (100, 1)).astype(np.uint16)  # columns 0..4000


def test_linear_window_saturates_outside(tmp_path):
    ds = make_dataset(gradient(), WindowCenter=2000, WindowWidth=1001)
    _, img, meta = read_image(save(ds, tmp_path / "w.dcm"), CFG)
    assert meta["voi_applied"] is True
    lo, hi = meta["intensity_range"]
    assert 1500 - 1 <= lo < hi <= 2500 + 1
    row = img[0, 112]  # the valid box spans all columns; values rise left to right
    assert (row == 0).mean() > 0.3 and (row == 65535).mean() > 0.3
    _, off, meta_off = read_image(save(ds, tmp_path / "w2.dcm"), ImageConfig(use_voi_lut=False))
    assert meta_off["voi_applied"] is False and (off[0, 112] == 0).mean() < 0.05


@pytest.mark.parametrize("center,width", [(2000, 0.5), (90000, 100), ("junk", 100)])
def test_degenerate_window_falls_back(tmp_path, center, width):
    _, plain, _ = read_image(save(make_dataset(gradient()), tmp_path / "p.dcm"), CFG)
    ds = make_dataset(gradient(), WindowWidth=width)
    ds.add_new("WindowCenter", "LO" if isinstance(center, str) else "DS", center)  # LO: a non-numeric value
    path = save(ds, tmp_path / "bad.dcm")
    _, img, meta = read_image(path, CFG)
    assert meta["voi_applied"] is False
    assert np.array_equal(img, plain)


def test_sigmoid_window(tmp_path):
    ds = make_dataset(gradient(), WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID")
    _, img, meta = read_image(save(ds, tmp_path / "s.dcm"), CFG)
    lo, hi = meta["intensity_range"]
    assert meta["voi_applied"] is True and 0 < lo < 2000 < hi < 4000
    assert np.all(np.diff(img[0, 112].astype(int)) >= 0)  # still monotone left to right


def test_voi_lut_sequence(tmp_path):
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", [min(65535, max(0, (v - 1000) * 32)) for v in range(4096)])  # 1000..3047
    ds = make_dataset(gradient(), VOILUTSequence=[item])
    _, img, meta = read_image(save(ds, tmp_path / "lut.dcm"), CFG)
    assert meta["voi_applied"] is True
    lo, hi = meta["intensity_range"]
    assert 1000 - 25 <= lo < hi <= 3048 + 25
    assert (img[0, 112] == 0).mean() > 0.2


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


def test_truncation_or_corruption_anywhere_never_crashes(tmp_path):
    data = save(make_dataset(anatomy(64, 64)), tmp_path / "full.dcm", compress=RLELossless).read_bytes()
    bad = tmp_path / "bad.dcm"
    rng = np.random.default_rng(0)
    reasons = set()
    for i in range(200):
        if i % 2:
            corrupt = data[: rng.integers(1, len(data))]
        else:  # overwrite a few bytes, mostly in the header
            corrupt = bytearray(data)
            for k in rng.integers(0, 1200 if i % 4 else len(data), size=rng.choice([1, 4, 16])):
                corrupt[k] = rng.integers(0, 256)
        bad.write_bytes(bytes(corrupt))
        try:
            _, image, _ = read_image(bad, CFG)
            assert image.shape == (1, 224, 224) and image.dtype == np.uint16
        except InvalidDicomError as e:
            reasons.add(e.reason)
    assert reasons <= REASONS and {"truncated", "not_dicom"} <= reasons


def test_no_pixel_data(tmp_path):
    path = save(make_dataset(None), tmp_path / "nopix.dcm")
    assert read_header(path).safe["modality"] == "CT"
    expect_error(path, "no_pixel_data")


def test_constant_image_is_empty(tmp_path):
    expect_error(save(make_dataset(np.full((32, 32), 7, np.uint16)), tmp_path / "c.dcm"), "empty_image")


def test_missing_rows_is_bad_geometry(tmp_path):
    ds = make_dataset(anatomy())
    del ds.Rows
    expect_error(save(ds, tmp_path / "g.dcm"), "bad_geometry")


def test_multi_frame_and_color_rejected(tmp_path):
    frames = np.stack([anatomy(), anatomy(seed=1)])
    ds = make_dataset(anatomy(), NumberOfFrames=2)
    ds.PixelData = frames.tobytes()
    err = expect_error(save(ds, tmp_path / "mf.dcm"), "multi_frame")
    assert "ingested as a volume with prepare.volume.enabled=true" in err.detail
    rgb = make_dataset(anatomy(), PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    rgb.PixelData = np.repeat(anatomy()[..., None], 3, axis=-1).tobytes()
    expect_error(save(rgb, tmp_path / "rgb.dcm"), "unsupported_photometric")


def test_missing_transfer_syntax_is_inferred(tmp_path):
    ds = make_dataset(anatomy())
    _, expected, _ = read_image(save(ds, tmp_path / "ok.dcm"), CFG)
    del ds.file_meta.TransferSyntaxUID
    ds.preamble = b"\x00" * 128
    path = tmp_path / "nots.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert pydicom.dcmread(path).file_meta.get("TransferSyntaxUID") is None
    _, image, _ = read_image(path, CFG)
    assert np.array_equal(image, expected)


# --- pydicom's own test files -------------------------------------------------------------------

_jpeg12 = "ok" if "pylibjpeg" in get_decoder(JPEGExtended12Bit).available_plugins else "decode_failed"
PYDICOM_FILES = {
    "CT_small.dcm": "ok",
    "MR_small.dcm": "ok",
    "MR_small_RLE.dcm": "ok",
    "MR_small_bigendian.dcm": "ok",
    "MR_small_implicit.dcm": "ok",
    "MR_small_padded.dcm": "ok",
    "MR_small_jp2klossless.dcm": "ok",
    "MR_small_jpeg_ls_lossless.dcm": "ok",
    "JPEG2000.dcm": "ok",
    "693_J2KI.dcm": "ok",
    "J2K_pixelrep_mismatch.dcm": "ok",
    "JPEGLSNearLossless_16.dcm": "ok",
    "image_dfl.dcm": "ok",
    "examples_overlay.dcm": "ok",
    "rtdose_1frame.dcm": "ok",
    "rtdose_rle_1frame.dcm": "ok",
    "liver_1frame.dcm": "ok",
    "JPEG-lossy.dcm": _jpeg12,
    "JPGExtended.dcm": _jpeg12,
    "JPEG2000-embedded-sequence-delimiter.dcm": "decode_failed",
    "rtplan.dcm": "no_pixel_data",
    "rtstruct.dcm": "no_pixel_data",
    "ExplVR_BigEndNoMeta.dcm": "no_pixel_data",
    "waveform_ecg.dcm": "no_pixel_data",
    "MR_truncated.dcm": "truncated",
    "rtplan_truncated.dcm": "truncated",
    "badVR.dcm": "bad_geometry",
    "meta_missing_tsyntax.dcm": "bad_geometry",
    "nested_priv_SQ.dcm": "bad_geometry",
    "no_meta.dcm": "not_dicom",
    "ExplVR_BigEnd.dcm": "unsupported_photometric",
    "SC_rgb_rle.dcm": "unsupported_photometric",
    "SC_rgb_jpeg_gdcm.dcm": "unsupported_photometric",
    "SC_ybr_full_422_uncompressed.dcm": "unsupported_photometric",
    "examples_palette.dcm": "unsupported_photometric",
    "examples_jpeg2k.dcm": "unsupported_photometric",
    "rtdose.dcm": "multi_frame",
    "rtdose_rle.dcm": "multi_frame",
}
_DATA_DIR = Path(pydicom.data.__file__).parent / "test_files"


@pytest.mark.parametrize("name", sorted(PYDICOM_FILES))
def test_pydicom_test_files(name):
    # never let get_testdata_file go to the network for a file this pydicom does not ship
    assert (_DATA_DIR / name).exists(), f"{name} is not shipped with this pydicom"
    path = pydicom.data.get_testdata_file(name)
    expected = PYDICOM_FILES[name]
    if expected == "ok":
        header, image, meta = read_image(path, CFG)
        assert image.shape == (1, 224, 224) and image.dtype == np.uint16
        assert image.max() > image.min()
        json.dumps(header.safe), json.dumps(meta)
    else:
        with pytest.raises(InvalidDicomError) as info:
            read_image(path, CFG)
        assert info.value.reason == expected, info.value
        assert path in str(info.value)


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
