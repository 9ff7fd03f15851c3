"""Tests for jepa_ray.ingest.decode: transfer syntaxes (compressed twins, a syntax inferred when the
file meta lacks it, pydicom's own test files) and the reduced-resolution JPEG 2000 decode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from dicomkit import CFG, anatomy, make_dataset, save
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import JPEG2000Lossless, JPEGExtended12Bit, RLELossless

from jepa_ray.config import ImageConfig
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.decode import _j2k_level
from jepa_ray.ingest.image import read_image

# --- transfer syntaxes --------------------------------------------------------------------------


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
