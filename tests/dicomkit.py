"""Small DICOM files for tests: a smooth 12-bit 'anatomy', a minimal CT dataset around it, and the
check that a read fails with a given reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from jepa_ray.config import ImageConfig
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.image import read_image

CFG = ImageConfig()


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
