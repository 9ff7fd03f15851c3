"""CT series -> volumes: ordering in space, the checks that quarantine a series, HU, enhanced
multi-frame CT, resampling, windows; pydicom's own CT file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from ctkit import AXIAL, phantom, write_enhanced, write_series

from jepa_ray.config import VolumeConfig, load_config
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.series import assemble, group_series, read_volume, resample, windows

CFG = VolumeConfig(min_slices=4)


def _volume(paths, cfg=CFG):
    series, problems = group_series(paths)
    assert not problems and len(series) == 1
    return assemble(next(iter(series.values())), cfg)


def test_shuffled_slice_files_give_the_same_volume_as_sorted_ones(tmp_path):
    hu = phantom(9)
    sorted_paths = write_series(tmp_path / "sorted", hu)
    order = np.random.default_rng(1).permutation(9)  # file names and InstanceNumber scrambled
    shuffled_paths = write_series(tmp_path / "shuffled", hu, order=order)
    a, b = _volume(sorted_paths), _volume(shuffled_paths[::-1])
    np.testing.assert_array_equal(a.hu, hu.astype(np.float32))  # stored + intercept = HU again
    np.testing.assert_array_equal(b.hu, a.hu)
    assert a.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert not a.multi_frame and len(a.paths) == 9


def test_an_oblique_series_is_ordered_along_its_normal(tmp_path):
    c, s = np.cos(0.4), np.sin(0.4)  # rows along x, columns tilted out of the axial plane
    orientation = (1.0, 0.0, 0.0, 0.0, c, s)
    hu = phantom(6)
    paths = write_series(tmp_path, hu, orientation=orientation, order=[3, 0, 5, 1, 4, 2])
    np.testing.assert_array_equal(_volume(paths).hu, hu.astype(np.float32))


def test_rescale_slope_and_intercept_are_applied_per_slice(tmp_path):
    hu = phantom(5)
    paths = write_series(tmp_path, hu)
    for k in range(3):  # three slices of the series stored with another slope and intercept
        ds = pydicom.dcmread(paths[k])
        ds.RescaleSlope, ds.RescaleIntercept = 2.0, -2048.0
        ds.PixelData = np.round((hu[k] + 2048.0) / 2).astype(np.uint16).tobytes()
        ds.save_as(paths[k])
    vol = _volume(paths)
    np.testing.assert_array_equal(vol.hu[:3], 2 * np.round((hu[:3] + 2048.0) / 2) - 2048)
    np.testing.assert_array_equal(vol.hu[3:], hu[3:].astype(np.float32))


@pytest.mark.parametrize(
    "break_it, reason, where",
    [
        ("missing", "series_gap", "0002.dcm"),
        ("duplicate", "series_duplicate_position", None),
        ("mixed_size", "series_mixed_size", "0004.dcm"),
        ("mixed_spacing", "series_mixed_size", "0004.dcm"),
        ("orientation", "series_orientation", "0004.dcm"),
        ("uneven", "series_spacing", None),
        ("few", "series_too_few_slices", "0000.dcm"),
        ("no_position", "series_geometry", "0004.dcm"),
    ],
)
def test_a_series_that_is_not_one_regular_volume_is_quarantined_with_its_reason(
    tmp_path, break_it, reason, where
):
    hu = phantom(8)
    paths = write_series(tmp_path, hu, skip={3} if break_it == "missing" else ())
    cfg = VolumeConfig(min_slices=10 if break_it == "few" else 4)
    edit = {
        "duplicate": lambda ds: setattr(
            ds, "ImagePositionPatient", list(pydicom.dcmread(paths[3]).ImagePositionPatient)
        ),
        "mixed_size": lambda ds: (
            setattr(ds, "Rows", 12),
            setattr(ds, "PixelData", np.zeros((12, hu.shape[2]), np.uint16).tobytes()),
        ),
        "mixed_spacing": lambda ds: setattr(ds, "PixelSpacing", [0.9, 0.7]),
        "orientation": lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.8, 0.6]),
        "uneven": lambda ds: setattr(
            ds,
            "ImagePositionPatient",
            [*list(ds.ImagePositionPatient)[:2], float(ds.ImagePositionPatient[2]) - 1.8],
        ),
        "no_position": lambda ds: delattr(ds, "ImagePositionPatient"),
    }.get(break_it)
    if edit is not None:
        ds = pydicom.dcmread(paths[4])
        edit(ds)
        ds.save_as(paths[4])
    series, problems = group_series(paths)
    if break_it == "no_position":  # a slice without a place is reported when the headers are read
        assert len(problems) == 1 and problems[0].reason == reason and problems[0].path.endswith(where)
        return
    with pytest.raises(InvalidDicomError) as info:
        assemble(next(iter(series.values())), cfg)
    assert info.value.reason == reason
    if where:
        assert info.value.path.endswith(where), info.value
    if break_it == "missing":
        assert "about 1 slice(s) missing" in str(info.value)


def test_enhanced_multi_frame_ct_assembles_like_the_slice_files(tmp_path):
    hu = phantom(7)
    slices = _volume(write_series(tmp_path / "slices", hu))
    path = write_enhanced(tmp_path / "enhanced.dcm", hu, order=[4, 1, 6, 0, 3, 5, 2])
    enhanced = _volume([path])
    assert enhanced.multi_frame and enhanced.paths == [str(path)]
    np.testing.assert_array_equal(enhanced.hu, slices.hu)
    assert enhanced.spacing == pytest.approx(slices.spacing)


def test_two_series_in_one_directory_and_an_unreadable_file(tmp_path):
    a = write_series(tmp_path / "a", phantom(5, seed=1))
    b = write_series(tmp_path / "b", phantom(6, seed=2))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    series, problems = group_series([*a, *b, junk])
    assert sorted(len(v) for v in series.values()) == [5, 6]
    assert [(p.path, p.reason) for p in problems] == [(str(junk), "not_dicom")]


def test_resampling_cropping_padding_and_windows(tmp_path):
    hu = np.full((10, 24, 20), -600, np.int16)  # 10 slices of 5 mm, 1x1 mm pixels
    hu[:, 8:16, 6:14] = 40
    vol = _volume(write_series(tmp_path, hu, step=5.0, spacing=(1.0, 1.0)))
    cfg = VolumeConfig(spacing=(2.5, 2.0, 2.0), size=(24, 8, 16), min_slices=4)
    out = resample(vol, cfg)
    assert out.shape == (24, 8, 16)
    # 50 mm of slices at 2.5 mm = 20, padded with air to 24 (2 each side); 24 rows at 2 mm = 12,
    # cropped to 8; 20 columns at 2 mm = 10, padded to 16 (3 each side)
    assert (out[:2] == -1024).all() and (out[-2:] == -1024).all()
    assert (out[:, :, :3] == -1024).all() and (out[:, :, -3:] == -1024).all()
    inner = out[2:-2, :, 3:-3]
    assert inner.min() >= -600 - 1e-3 and inner.max() <= 40 + 1e-3
    assert inner[:, 4, 5] == pytest.approx(40, abs=1e-3)  # inside the square
    w = windows(out, cfg)
    assert w.shape == (2, 24, 8, 16) and w.min() >= 0 and w.max() <= 1
    lung, mediastinum = w
    assert lung[2, 0, 3] == pytest.approx(0.5)  # -600 HU is the lung window's centre
    assert mediastinum[10, 4, 8] == pytest.approx(0.5)  # 40 HU the mediastinum's
    assert lung[0, 0, 0] == pytest.approx((-1024 + 1350) / 1500)  # air, in a window from -1350 HU
    assert mediastinum[0, 0, 0] == 0 and mediastinum[2, 0, 3] == 0  # air and lung: below -160 HU
    x, meta = read_volume(
        next(iter(group_series(write_series(tmp_path / "b", hu, step=5.0))[0].values())), cfg
    )
    assert x.shape == (2, 24, 8, 16) and meta["slices"] == 10 and meta["source_spacing_mm"][0] == 5.0


def test_pydicoms_ct_file_alone_is_quarantined_and_as_a_series_assembles(tmp_path):
    source = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    series, problems = group_series([source])
    assert not problems
    with pytest.raises(InvalidDicomError) as info:
        assemble(next(iter(series.values())), VolumeConfig())
    assert info.value.reason == "series_too_few_slices" and "1 slices" in str(info.value)
    # the same real file at five positions 3 mm apart (new SOP instance uids): a series
    ref = pydicom.dcmread(source)
    normal = np.cross(
        np.array(ref.ImageOrientationPatient[:3], float), np.array(ref.ImageOrientationPatient[3:], float)
    )
    paths = []
    for k in (2, 0, 4, 1, 3):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient = list(np.array(ref.ImagePositionPatient, float) + 3.0 * k * normal)
        path = tmp_path / f"s{k}.dcm"
        shutil.copy(source, path)
        ds.save_as(path)
        paths.append(path)
    vol = _volume(paths, VolumeConfig(min_slices=5))
    expected = ref.pixel_array * float(ref.RescaleSlope) + float(ref.RescaleIntercept)
    assert vol.hu.shape == (5, 128, 128) and vol.spacing[0] == pytest.approx(3.0)
    np.testing.assert_allclose(vol.hu[2], expected)


def test_volume_settings_are_validated_by_the_config():
    with pytest.raises(Exception, match="width must be > 0"):
        load_config(overrides=["prepare.volume.windows={lung: [-600, 0]}"])
    with pytest.raises(Exception, match="spacing must be > 0"):
        load_config(overrides=["prepare.volume.spacing=[0, 1, 1]"])
    assert load_config(overrides=["prepare.volume.size=[32, 64, 64]"]).prepare.volume.size == (32, 64, 64)
    with pytest.raises(
        Exception, match=r"volume_size \(16, 48, 48\) is not a multiple of tubelet \(5, 12, 12\)"
    ):
        load_config(
            overrides=["pipeline.dims=3", "pipeline.volume_size=[16,48,48]", "pipeline.tubelet=[5,12,12]"]
        )
    with pytest.raises(Exception, match="min_context_patches must be below the 16 patches"):  # 4x4 in plane
        load_config(
            overrides=[
                "pipeline.dims=3",
                "pipeline.volume_size=[16,32,32]",
                "pipeline.tubelet=[4,8,8]",
                "pipeline.mask.min_context_patches=16",
            ]
        )
    assert AXIAL == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_slice_masks_follow_the_slices_spatial_order_and_the_volumes_resampling(tmp_path):
    """Per-slice mask PNGs of shuffled slice files, and per-frame ones of a shuffled enhanced file,
    both give the mask of the spatially ordered truth resampled as the volume is; a structure a
    slice's folder lacks is empty there."""
    from PIL import Image

    from jepa_ray.ingest.masks import read_volume_masks
    from jepa_ray.ingest.series import Volume

    hu = phantom(8)
    truth = np.zeros(hu.shape, bool)  # a box that moves with the slice index: order matters
    for k in range(8):
        truth[k, 2 + k : 10 + k, 3:12] = True
    cfg = VolumeConfig(min_slices=4, spacing=(5.0, 1.6, 1.4), size=(6, 16, 16))
    expected = resample(Volume(truth.astype(np.float32), (2.5, 0.8, 0.7)), cfg, pad=0.0) >= 0.5
    assert 0 < expected.sum() < expected.size

    def write(folder: Path, plane: np.ndarray, with_heart: bool) -> None:
        folder.mkdir(parents=True)
        Image.fromarray(plane.astype(np.uint8) * 255).save(folder / "lesion.png")
        if with_heart:
            Image.fromarray(np.zeros(plane.shape, np.uint8)).save(folder / "heart.png")

    order = [5, 2, 7, 0, 3, 6, 1, 4]
    paths = write_series(tmp_path / "slices", hu, order=order)
    folders = {}
    for path, k in zip(paths, order, strict=True):
        folders[str(path)] = str(tmp_path / "masks" / path.stem)
        write(Path(folders[str(path)]), truth[k], with_heart=k != 4)
    volume = _volume(paths, cfg)
    planes, names = read_volume_masks(folders, volume, cfg, 10**6)
    assert names == ["heart", "lesion"] and planes.shape == (2, 6, 16, 16)
    np.testing.assert_array_equal(planes[1].astype(bool), expected)
    assert not planes[0].any()

    enhanced = write_enhanced(tmp_path / "enhanced.dcm", hu, order=order)
    root = tmp_path / "masks-enhanced"
    for frame, k in enumerate(order):
        write(root / f"frame-{frame + 1}", truth[k], with_heart=True)
    planes, names = read_volume_masks({str(enhanced): str(root)}, _volume([enhanced], cfg), cfg, 10**6)
    np.testing.assert_array_equal(planes[names.index("lesion")].astype(bool), expected)

    shutil.rmtree(root / "frame-3")  # one frame unannotated: not known to be empty
    with pytest.raises(InvalidDicomError, match="1 of the series' 8 slices have no mask folder") as e:
        read_volume_masks({str(enhanced): str(root)}, _volume([enhanced], cfg), cfg, 10**6)
    assert e.value.reason == "mask_incomplete"
