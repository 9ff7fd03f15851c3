"""Write small CT series for tests: one file per slice, or one enhanced multi-frame file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def phantom(slices: int, rows: int = 24, cols: int = 20, seed: int = 0) -> np.ndarray:
    """HU values in which every slice is different (its index is in the mean): (Z, Y, X) int16."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-1000, 400, size=(slices, rows, cols))
    return (base + 37 * np.arange(slices)[:, None, None]).astype(np.int16)


def _base(series: str, rows: int, cols: int, sop_class: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series
    ds.Modality = "CT"
    ds.PatientID = "CT-TEST"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def positions(slices: int, step: float, orientation=AXIAL, origin=(-10.0, -12.0, 30.0)) -> list[tuple]:
    o = np.array(orientation, float)
    normal = np.cross(o[:3], o[3:])
    return [tuple(np.array(origin) + k * step * normal) for k in range(slices)]


def write_series(
    root: Path,
    hu: np.ndarray,
    step: float = 2.5,
    spacing=(0.8, 0.7),
    orientation=AXIAL,
    series: str | None = None,
    order=None,
    skip=(),
    intercept: float = -1024.0,
    slope: float = 1.0,
) -> list[Path]:
    """One file per slice, file k holding slice order[k] (default: the spatial order); slices in `skip`
    left out. Stored values are (hu - intercept) / slope."""
    root.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    pos = positions(len(hu), step, orientation)
    order = list(range(len(hu))) if order is None else list(order)
    paths = []
    for name, k in enumerate(order):
        if k in skip:
            continue
        ds = _base(series, hu.shape[1], hu.shape[2], CT_IMAGE)
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = list(pos[k])
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = step
        ds.InstanceNumber = name + 1  # deliberately not the spatial order
        ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
        ds.PixelData = np.round((hu[k].astype(float) - intercept) / slope).astype(np.uint16).tobytes()
        path = root / f"{name:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced(path: Path, hu: np.ndarray, step: float = 2.5, spacing=(0.8, 0.7), order=None) -> Path:
    """One Enhanced CT file; frames stored in `order` (default spatial), positions per frame."""
    ds = _base(generate_uid(), hu.shape[1], hu.shape[2], ENHANCED_CT)
    order = list(range(len(hu))) if order is None else list(order)
    ds.NumberOfFrames = len(hu)
    shared = Dataset()
    measures, orient, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = list(spacing), step
    orient.ImageOrientationPatient = list(AXIAL)
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1024.0, 1.0, "HU"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    pos = positions(len(hu), step)
    frames = []
    for k in order:
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = list(pos[k])
        item.PlanePositionSequence = Sequence([plane])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack([(hu[k].astype(float) + 1024).astype(np.uint16) for k in order]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
