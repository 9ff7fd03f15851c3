"""Tests for jepa_ray.ingest.image: the intensity pipeline (rescale, photometric, VOI), geometry,
the pixel-module checks and their failure reasons, and reads of corrupt files that never crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicomkit import CFG, anatomy, expect_error, make_dataset, save
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from jepa_ray.config import ImageConfig
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.header import read_header
from jepa_ray.ingest.image import read_image

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


# --- failures -----------------------------------------------------------------------------------


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
