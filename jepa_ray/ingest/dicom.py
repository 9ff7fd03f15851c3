"""Read DICOM files: an allowlisted header and a fixed-size, normalised single-channel image.

Every failure raises `InvalidDicomError(path, reason, detail)`; `reason` is one of:

- `unreadable_file`: the file cannot be opened (missing, permissions, a directory).
- `not_dicom`: empty, or neither a DICOM Part 10 file ('DICM' at byte 128) nor a raw dataset.
- `truncated`: the file ends before the dataset or its pixel data does.
- `unreadable_header`: pydicom cannot parse the header (corrupt, not truncated).
- `no_pixel_data`: no (Float/DoubleFloat) PixelData element, e.g. an RT plan or a structured report.
- `bad_geometry`: Rows/Columns/BitsAllocated missing or zero, or NumberOfFrames not an integer.
- `over_limit`: beyond a cap of `prepare.limits` (bytes on disk, inflated bytes of a deflated
  dataset, pixels), checked before anything is inflated or decoded.
- `multi_frame`: NumberOfFrames > 1 where a 2-D image is read (an enhanced CT is read as a volume
  by `jepa_ray.ingest.series`, with prepare.volume.enabled; cine is not supported).
- `unsupported_photometric`: not MONOCHROME1/MONOCHROME2 (RGB, YBR_*, PALETTE COLOR): grey only.
- `decode_failed`: no codec for the transfer syntax, a corrupt stream, or an unexpected decoder error.
- `empty_image`: constant or all-NaN pixels.

PHI: `DicomHeader.safe`, image metadata and error details hold only values of `ALLOWED_KEYWORDS`;
decoder messages are included only after removing every non-allowlisted text value of the header,
and pydicom's own warnings (which can echo element values) are kept out of logs and stderr.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any, BinaryIO

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from jepa_ray.config import ImageConfig, LimitsConfig
from jepa_ray.errors import InvalidDicomError

logger = logging.getLogger(__name__)

# DICOM keyword -> (key in `DicomHeader.safe`, kind of value).
_SAFE_FIELDS: dict[str, tuple[str, str]] = {
    "Modality": ("modality", "term"),
    "ViewPosition": ("view", "term"),
    "BodyPartExamined": ("body_part", "term"),
    "ImageLaterality": ("laterality", "enum"),
    "PatientSex": ("sex", "enum"),
    "PhotometricInterpretation": ("photometric", "enum"),
    "PresentationIntentType": ("presentation_intent", "enum"),
    "ImageType": ("image_type", "image_type"),
    "BurnedInAnnotation": ("burned_in", "enum"),
    "SamplesPerPixel": ("samples_per_pixel", "int"),
    "BitsAllocated": ("bits_allocated", "int"),
    "BitsStored": ("bits_stored", "int"),
    "PixelRepresentation": ("pixel_representation", "int"),
    "Rows": ("rows", "int"),
    "Columns": ("columns", "int"),
    "NumberOfFrames": ("number_of_frames", "int"),
    "PixelSpacing": ("pixel_spacing_mm", "spacing"),
    "ImagerPixelSpacing": ("imager_pixel_spacing_mm", "spacing"),
    "SliceThickness": ("slice_thickness_mm", "float"),
    "Manufacturer": ("manufacturer", "vendor"),
    "SOPClassUID": ("sop_class", "uid_name"),
    "TransferSyntaxUID": ("transfer_syntax", "uid_name"),
}
ALLOWED_KEYWORDS: tuple[str, ...] = tuple(_SAFE_FIELDS)
# Enumerated values (PS3.3): anything else is dropped, so a misplaced identifier cannot pass.
_ENUMS = {
    "ImageLaterality": {"R", "L", "U", "B"},
    "PatientSex": {"M", "F", "O"},
    "PresentationIntentType": {"FOR PRESENTATION", "FOR PROCESSING"},
    "BurnedInAnnotation": {"YES", "NO"},
    "PhotometricInterpretation": {
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "XYB", "YBR_FULL",
        "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
    },
}  # fmt: skip
# Defined terms (PS3.3, PS3.16 for body parts) and the variants scanners write; any other value of
# these code-string fields becomes "OTHER": a CS field accepts 16 characters with spaces, room for a
# name or an MRN typed into the wrong box, so nothing but a known term is ever copied.
_TERMS = {
    "Modality": {
        "CR", "DX", "CT", "MR", "US", "MG", "PT", "NM", "XA", "RF", "OT", "SC", "IO", "PX", "RG", "ES",
        "OP", "OCT", "SM", "XC", "BMD", "DOC", "SR", "KO", "PR", "SEG", "REG", "RTIMAGE", "RTSTRUCT",
        "RTDOSE", "RTPLAN",
    },
    "ViewPosition": {
        "AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO", "LATERAL", "LAT", "LLAT", "RLAT", "AP AXIAL",
        "PA AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD", "XTABLE LATERAL", "LAO", "RAO", "LPO", "RPO",
        "CC", "MLO", "ML", "LM", "XCCL", "XCCM", "FB", "SIO", "AXIAL", "SAGITTAL", "CORONAL",
    },
    "BodyPartExamined": {
        "CHEST", "THORAX", "LUNG", "HEART", "ABDOMEN", "PELVIS", "CHESTABDOMEN", "CHESTABDPELVIS",
        "ABDOMENPELVIS", "HEAD", "BRAIN", "SKULL", "NECK", "HEADNECK", "CSPINE", "TSPINE", "LSPINE",
        "SPINE", "WHOLESPINE", "SHOULDER", "CLAVICLE", "HUMERUS", "ELBOW", "FOREARM", "WRIST", "HAND",
        "FINGER", "HIP", "FEMUR", "KNEE", "LEG", "ANKLE", "FOOT", "TOE", "BREAST", "EXTREMITY",
        "WHOLEBODY", "RIB", "STERNUM", "SACRUM", "COCCYX", "KIDNEY", "LIVER", "PROSTATE", "EYE", "JAW",
        "TMJ", "SINUS", "ORBIT", "PORT CHEST", "CHEST_PA", "CHEST_LAT", "THORACIC",
    },
}  # fmt: skip
_IMAGE_TYPE = ({"ORIGINAL", "DERIVED"}, {"PRIMARY", "SECONDARY"})  # ImageType values 1 and 2
# Manufacturer (free text, LO) reduced to the vendor: a prefix of the upper-cased value -> its name.
_VENDORS = {
    "GE": "GE", "SIEMENS": "SIEMENS", "PHILIPS": "PHILIPS", "CANON": "CANON", "TOSHIBA": "CANON",
    "FUJI": "FUJIFILM", "AGFA": "AGFA", "CARESTREAM": "CARESTREAM", "KODAK": "CARESTREAM",
    "KONICA": "KONICA MINOLTA", "HOLOGIC": "HOLOGIC", "SAMSUNG": "SAMSUNG", "HITACHI": "HITACHI",
    "SHIMADZU": "SHIMADZU", "UNITED IMAGING": "UNITED IMAGING", "UIH": "UNITED IMAGING",
    "NEUSOFT": "NEUSOFT", "ESAOTE": "ESAOTE", "VARIAN": "VARIAN", "ELEKTA": "ELEKTA", "PLANMED": "PLANMED",
    "DRGEM": "DRGEM", "VIEWORKS": "VIEWORKS", "RAYENCE": "RAYENCE", "IMAGING DYNAMICS": "IMAGING DYNAMICS",
    "SWISSRAY": "SWISSRAY",
}  # fmt: skip

_DATE_PAIRS = (
    ("StudyDate", "StudyTime"),
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("AcquisitionDateTime", None),
    ("ContentDate", "ContentTime"),
)
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PERCENTILE_SAMPLES = 2**14

# pydicom's warnings and log records can quote element values (e.g. "Invalid value for VR DA: '...'"):
# while one of our reads runs in this context, they are captured instead of shown.
_IN_READ: contextvars.ContextVar[bool] = contextvars.ContextVar("jepa_ray_dicom_read", default=False)
for _name in ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils"):
    logging.getLogger(_name).addFilter(lambda record: not _IN_READ.get())


@dataclass(frozen=True)
class DicomHeader:
    """Identifiers (kept in memory only, never written) and the allowlisted `safe` metadata of a file."""

    path: str
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    study_time: datetime | None
    institution: str | None
    safe: dict[str, Any]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Capture pydicom's warnings and log records for the duration of one read."""
    token = _IN_READ.set(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        if caught:
            logger.debug(
                "pydicom emitted %d warning(s) (not shown: they can quote header values)", len(caught)
            )
    finally:
        _IN_READ.reset(token)


def _looks_like_raw_dataset(head: bytes) -> bool:
    """True when a file without preamble starts with a group 0002/0008 element (old raw datasets)."""
    if len(head) < 8:
        return False
    for end in "<>":
        group, elem = struct.unpack(end + "HH", head[:4])
        if group in (0x0002, 0x0008) and elem < 0x0100:
            vr = head[4:6]
            if (vr.isalpha() and vr.isupper()) or struct.unpack(end + "I", head[4:8])[0] < 1024:
                return True
    return False


def _is_cut(ds: Dataset, size: int) -> bool:
    """True when a top-level element's value runs past the end of the file (pydicom reads it short)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    groups = [meta] if meta is not None else []
    if not (ts is not None and UID(ts).is_deflated):  # deflated positions refer to the inflated stream
        groups.append(ds)
    for group in groups:
        for elem in group.elements():
            length, tell = getattr(elem, "length", None), getattr(elem, "value_tell", None)
            if length is None or tell is None or length == 0xFFFFFFFF:
                continue
            if tell + length > size:
                return True
    return False


def _deflated_start(f: BinaryIO) -> int | None:
    """Where the dataset starts (after the file meta group 0002 that follows the preamble) when the
    file meta names the deflated transfer syntax (1.2.840.10008.1.2.1.99); None otherwise."""
    f.seek(132)
    deflated, end = False, 132
    try:
        for elem in data_element_generator(f, False, True, stop_when=lambda tag, vr, length: tag.group != 2):
            end = elem.value_tell + elem.length
            if elem.tag == 0x00020010:
                deflated = UID(elem.value.decode("ascii", "replace").strip(" \0")).is_deflated
    except Exception:  # an unreadable meta group: dcmread reports it
        return None
    return end if deflated else None


def _check_inflated_size(f: BinaryIO, path: str, start: int, limit: int) -> None:
    """Count a deflate-compressed dataset's inflated bytes in bounded steps (a few MB of memory
    whatever the ratio) before pydicom inflates it whole: a 400 KB file can inflate to gigabytes."""
    f.seek(start)
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while chunk := f.read(2**20):
        while chunk:
            try:
                total += len(inflate.decompress(chunk, 2**22))
            except zlib.error:
                raise InvalidDicomError(
                    path, "unreadable_header", "the deflate-compressed dataset is corrupt"
                ) from None
            if total > limit:
                raise InvalidDicomError(
                    path,
                    "over_limit",
                    f"the deflate-compressed dataset inflates beyond {limit} bytes "
                    "(prepare.limits.max_inflated_bytes): a decompression bomb or a huge file",
                )
            chunk = inflate.unconsumed_tail
            if inflate.eof:
                return


def read_dataset(path: str, pixels: bool, limits: LimitsConfig | None = None) -> Dataset:
    """dcmread `path` once (with or without pixels); every failure becomes InvalidDicomError. Files
    over `limits` (size on disk, inflated size of a deflated dataset) are refused before parsing."""
    limits = limits or LimitsConfig()
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the size check needs the handle
    except OSError as e:
        raise InvalidDicomError(path, "unreadable_file", f"cannot open the file: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise InvalidDicomError(path, "not_dicom", "the file is empty (0 bytes)")
        if size > limits.max_file_bytes:
            raise InvalidDicomError(
                path,
                "over_limit",
                f"{size} bytes on disk, more than prepare.limits.max_file_bytes={limits.max_file_bytes}",
            )
        head = f.read(132)
        f.seek(0)
        force = False
        if head[128:132] != b"DICM":
            if not _looks_like_raw_dataset(head):
                raise InvalidDicomError(
                    path,
                    "not_dicom",
                    "no 'DICM' marker at byte 128 and the file does not start with a DICOM element: "
                    "not a DICOM file",
                )
            force = True  # a dataset without preamble/file meta, as old archives wrote them
        elif (start := _deflated_start(f)) is not None:
            _check_inflated_size(f, path, start, limits.max_inflated_bytes)
        f.seek(0)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(f, force=force, stop_before_pixels=not pixels)
        except pydicom.errors.InvalidDicomError:
            raise InvalidDicomError(path, "not_dicom", "pydicom does not recognise a DICOM file") from None
        except Exception as e:  # pydicom raises OSError/struct.error/ValueError/... on bad bytes
            if f.tell() >= size:
                raise InvalidDicomError(
                    path, "truncated", f"the file ends inside the header ({type(e).__name__})"
                ) from None
            raise InvalidDicomError(
                path,
                "unreadable_header",
                f"pydicom cannot parse the header ({type(e).__name__}); the file is corrupt",
            ) from None
        try:
            cut = any("End of file" in str(w.message) for w in caught) or _is_cut(ds, size)
        except Exception as e:  # e.g. an unknown VR or a TransferSyntaxUID that is no transfer syntax
            raise InvalidDicomError(
                path, "unreadable_header", f"the header is corrupt ({type(e).__name__})"
            ) from None
        if cut:
            raise InvalidDicomError(
                path,
                "truncated",
                f"the file ends ({size} bytes) before its dataset does: cut short, or a corrupt length field",
            )
    return ds


def header_value(ds: Dataset, keyword: str) -> Any:
    """The element's value, or None when absent, empty or unconvertible."""
    try:
        value = ds.get(keyword, None)
    except Exception:  # a corrupt raw value can fail its VR conversion
        return None
    if value is None or value == "" or (isinstance(value, list | MultiValue) and len(value) == 0):
        return None
    return value


def _text(ds: Dataset, keyword: str) -> str | None:
    value = header_value(ds, keyword)
    return (str(value).strip() or None) if value is not None else None


def _to_int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        number = to_float(value)  # "1.0" is a valid IS for pydicom
        return int(number) if number is not None and number.is_integer() else None


def to_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _safe_value(value: Any, kind: str, keyword: str = "") -> Any:
    """Sanitise an allowlisted value to a plain JSON value; None when it does not look valid."""
    if value is None:
        return None
    if kind == "enum":
        text = str(value).strip().upper()
        return text if text in _ENUMS[keyword] else None
    if kind == "term":  # a defined term, "OTHER" for anything else present
        text = " ".join(str(value).strip().upper().split())
        return None if not text else text if text in _TERMS[keyword] else "OTHER"
    if kind == "image_type":
        items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
        kept = [str(v).strip().upper() for v in items[:2]]
        return [v if v in allowed else "OTHER" for v, allowed in zip(kept, _IMAGE_TYPE, strict=False)] or None
    if kind == "vendor":
        text = " ".join(str(value).strip().upper().split())
        if not text:
            return None
        return next((name for prefix, name in _VENDORS.items() if text.startswith(prefix)), "OTHER")
    if kind == "int":
        return _to_int(value)
    if kind == "float":
        return to_float(value)
    if kind == "spacing":
        items = [to_float(v) for v in value] if isinstance(value, list | MultiValue) else []
        return items if len(items) == 2 and all(v is not None and v > 0 for v in items) else None
    if kind == "uid_name":
        uid = UID(str(value).strip())
        return uid.name if uid.name != str(uid) else None
    raise ValueError(f"unknown safe-field kind {kind!r}")


def _parse_date(text: str) -> date | None:
    digits = text.strip().replace(".", "").replace("-", "")  # ACR-NEMA wrote YYYY.MM.DD
    if len(digits) < 8 or not digits[:8].isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def _parse_time(text: str) -> time | None:
    main, _, frac = text.strip().replace(":", "").partition(".")
    main = main[:6]
    if len(main) not in (2, 4, 6) or not main.isdigit():
        return None
    h, m, s = int(main[:2]), int(main[2:4] or 0), min(int(main[4:6] or 0), 59)  # 60 = leap second
    micro = int((frac[:6] + "000000")[:6]) if frac[:6].isdigit() else 0
    try:
        return time(h, m, s, micro)
    except ValueError:
        return None


def _study_time(ds: Dataset) -> datetime | None:
    """StudyDate+StudyTime, else the series/acquisition/content date (+ time); naive, None if unusable."""
    for date_kw, time_kw in _DATE_PAIRS:
        raw = _text(ds, date_kw)
        day = _parse_date(raw) if raw else None
        if day is None:
            continue
        if time_kw is None:  # a DT: YYYYMMDDHHMMSS.FFFFFF&ZZXX
            tod = _parse_time(re.split(r"[+&-]", raw.strip()[8:])[0]) if len(raw.strip()) > 8 else None
        else:
            raw_time = _text(ds, time_kw)
            tod = _parse_time(raw_time) if raw_time else None
        return datetime.combine(day, tod or time())
    return None


def _header(ds: Dataset, path: str) -> DicomHeader:
    meta = getattr(ds, "file_meta", None)
    safe: dict[str, Any] = {}
    for keyword, (key, kind) in _SAFE_FIELDS.items():
        source = meta if keyword == "TransferSyntaxUID" else ds
        safe[key] = _safe_value(header_value(source, keyword) if source is not None else None, kind, keyword)
    if safe["number_of_frames"] is None and safe["rows"] is not None and "NumberOfFrames" not in ds:
        safe["number_of_frames"] = 1
    return DicomHeader(
        path=path,
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        study_time=_study_time(ds),
        institution=_text(ds, "InstitutionName"),
        safe=safe,
    )


def read_header(path: str | os.PathLike, limits: LimitsConfig | None = None) -> DicomHeader:
    """Read the header only (no pixels); InvalidDicomError when the file is not a readable DICOM."""
    path = os.fspath(path)
    with quiet():
        ds = read_dataset(path, pixels=False, limits=limits)
        try:
            return _header(ds, path)
        except Exception as e:  # defensive: _header tolerates bad values one by one
            raise InvalidDicomError(
                path, "unreadable_header", f"header values unusable ({type(e).__name__})"
            ) from None


def _scrub(text: str, ds: Dataset) -> str:
    """Remove every text value of non-allowlisted header elements from a (decoder) message."""
    secrets: set[str] = set()
    try:
        for elem in ds.iterall():
            if elem.VR in _TEXT_VRS and elem.keyword not in _SAFE_FIELDS:
                values = elem.value if isinstance(elem.value, list | MultiValue) else [elem.value]
                secrets.update(s for v in values if len(s := str(v).strip()) >= 3)
    except Exception:  # an unparsable element: nothing can be vouched for
        return "<message withheld>"
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 6:
            text = text.replace(secret, "<redacted>")
        else:  # short values only as whole tokens: "DCM" must not mangle "GDCM"
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "<redacted>", text)
    return " ".join(text.split())[:300]


def _check_pixel_module(ds: Dataset, path: str, header: DicomHeader, max_pixels: int) -> tuple[int, int]:
    """Raise for what `read_image` cannot use; return (rows, cols)."""
    safe = header.safe
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        kind = f" (Modality {safe['modality']})" if safe["modality"] else ""
        raise InvalidDicomError(
            path, "no_pixel_data", f"the file has no PixelData element{kind}: not an image"
        )
    rows, cols, bits = safe["rows"], safe["columns"], safe["bits_allocated"]
    if not rows or not cols or not bits or rows < 1 or cols < 1:
        raise InvalidDicomError(
            path,
            "bad_geometry",
            "Rows, Columns or BitsAllocated is missing or zero; the pixels cannot be laid out",
        )
    if rows * cols > max_pixels:
        raise InvalidDicomError(
            path,
            "over_limit",
            f"{rows}x{cols} pixels, more than prepare.limits.max_pixels={max_pixels}: not decoded",
        )
    if (
        "NumberOfFrames" in ds
        and header_value(ds, "NumberOfFrames") is not None
        and safe["number_of_frames"] is None
    ):
        raise InvalidDicomError(path, "bad_geometry", "NumberOfFrames is not an integer")
    photometric = safe["photometric"]
    if header_value(ds, "PhotometricInterpretation") is None and (safe["samples_per_pixel"] or 1) == 1:
        photometric = "MONOCHROME2"  # absent in old ACR-NEMA style files
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or (safe["samples_per_pixel"] or 1) != 1:
        raise InvalidDicomError(
            path,
            "unsupported_photometric",
            f"PhotometricInterpretation {photometric or 'unrecognised'} with {safe['samples_per_pixel']} "
            "samples per pixel: only single-channel MONOCHROME1/MONOCHROME2 images are supported",
        )
    if "PhotometricInterpretation" not in ds:
        ds.PhotometricInterpretation = photometric
    frames = safe["number_of_frames"] or 1
    if frames > 1:
        raise InvalidDicomError(
            path,
            "multi_frame",
            f"{frames} frames: not a 2-D image (an enhanced CT is ingested as a volume with "
            "prepare.volume.enabled=true; cine is not supported)",
        )
    return rows, cols


_J2K_SYNTAXES = {JPEG2000Lossless, JPEG2000}


@dataclass(frozen=True)
class _J2kHeader:
    rows: int
    cols: int
    offset: tuple[int, int]
    components: int
    precision: int
    signed: bool
    levels: int  # wavelet decomposition levels: a decoder can stop at 1/2, 1/4, ... 1/2**levels


def _j2k_header(cs: bytes) -> _J2kHeader:
    """The main-header facts of a raw JPEG 2000 codestream (SIZ and COD, ISO 15444-1 A.5.1, A.6.1)."""
    if cs[:4] != b"\xff\x4f\xff\x51":  # SOC then SIZ: a codestream, not a JP2 file
        raise ValueError("not a raw JPEG 2000 codestream")
    segments: dict[int, bytes] = {}
    pos = 2
    while pos + 4 <= len(cs):
        marker, length = struct.unpack_from(">HH", cs, pos)
        if marker == 0xFF90 or length < 2:  # SOT: the first tile-part, the main header is over
            break
        segments.setdefault(marker, cs[pos + 4 : pos + 2 + length])
        pos += 2 + length
    siz, cod = segments.get(0xFF51, b""), segments.get(0xFF52, b"")
    if len(siz) < 37 or len(cod) < 6:
        raise ValueError("no usable SIZ/COD marker segment")
    xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", siz, 2)
    (components,) = struct.unpack_from(">H", siz, 34)
    ssiz = siz[36]
    return _J2kHeader(
        ysiz - y0, xsiz - x0, (y0, x0), components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), cod[5]
    )


def _ceil_div(n: int, p: int) -> int:
    return -(-n // p)


def _j2k_level(rows: int, cols: int, size: int, levels: int) -> int:
    """The coarsest resolution level whose image keeps its longer side >= `size` (0: full resolution)."""
    level = 0
    for r in range(1, levels + 1):
        p = 1 << r
        if _ceil_div(max(rows, cols), p) < size:
            break
        # openjpeg's reduced image has ceil(n / 2**r) rows (ISO 15444-1 B.5); Pillow sizes its buffer by
        # rounding half up and fails when the two differ, so only the levels where they agree are used
        if all((n + p // 2) // p == _ceil_div(n, p) for n in (rows, cols)):
            level = r
    return level


def _decode_j2k_reduced(ds: Dataset, rows: int, cols: int, size: int) -> tuple[np.ndarray, int] | None:
    """JPEG 2000 pixels decoded at a coarser wavelet level, as stored values; None: decode in full.

    The wavelet's low-pass band at level r is the image at 1/2**r resolution with the same value
    range, so decoding stops early instead of reconstructing pixels the resize throws away.
    """
    from PIL import Image
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        info = _j2k_header(frame)
    except Exception:  # not a plain codestream: the full decoder judges it
        return None
    if (
        info.signed
        or info.components != 1
        or info.offset != (0, 0)
        or (info.rows, info.cols) != (rows, cols)
        or info.precision > 16
    ):
        return None
    level = _j2k_level(rows, cols, size, info.levels)
    if level == 0:
        return None
    try:
        with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as im:
            im.reduce = level
            im.load()
            mode, arr = im.mode, np.asarray(im)
    except Exception as e:  # a stream the reduced decode cannot read may still decode in full
        logger.debug("reduced JPEG 2000 decode failed (%s); decoding in full", type(e).__name__)
        return None
    if arr.shape != (_ceil_div(rows, 1 << level), _ceil_div(cols, 1 << level)):
        return None
    bits = {"I;16": 16, "L": 8}.get(mode)
    if bits is None or info.precision > bits:
        return None
    return arr >> (bits - info.precision), level  # Pillow scales the stored bits up to its mode's


def _transfer_syntax(ds: Dataset) -> Any:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def decode_pixels(ds: Dataset, path: str, rows: int, cols: int, frames: int = 1) -> np.ndarray:
    """The stored pixel values, (rows, cols) or (frames, rows, cols), decoded with whichever plugin
    pydicom finds."""
    meta = getattr(ds, "file_meta", None)
    ts = _transfer_syntax(ds)
    pixel = next(ds[k] for k in _PIXEL_KEYWORDS if k in ds)
    if ts is None:
        if pixel.is_undefined_length:
            raise InvalidDicomError(
                path, "decode_failed", "compressed pixel data but no TransferSyntaxUID in the file meta"
            )
        # A native dataset without file meta: the encoding pydicom parsed it with tells the syntax.
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = ts
    ts = UID(ts)
    name = ts.name if ts.name != str(ts) else "an unrecognised transfer syntax"
    if pixel.keyword == "PixelData" and not ts.is_encapsulated and not pixel.is_undefined_length:
        bits = header_value(ds, "BitsAllocated")
        expected = (frames * rows * cols * bits + 7) // 8
        if len(pixel.value or b"") < expected:
            layout = f"{frames}x{rows}x{cols}" if frames > 1 else f"{rows}x{cols}"
            raise InvalidDicomError(
                path,
                "truncated",
                f"PixelData holds {len(pixel.value or b'')} bytes but {layout}x{bits} bits need "
                f"{expected}: the pixel data was cut short",
            )
    try:
        decoder = get_decoder(ts) if ts.is_encapsulated else None
    except NotImplementedError:
        raise InvalidDicomError(path, "decode_failed", f"pydicom has no pixel decoder for {name}") from None
    if decoder is not None and not decoder.is_available:
        need = "; ".join(decoder.missing_dependencies)
        raise InvalidDicomError(
            path, "decode_failed", f"no decoder installed for {name}; install one of: {need}"
        )
    preferred = decoder is not None and ts in _J2K_SYNTAXES and "pylibjpeg" in decoder.available_plugins
    if preferred:
        # openjpeg through pylibjpeg is single-threaded and, per core, faster than gdcm's threaded
        # decoder: the right choice when every core already runs a decoding worker
        ds.pixel_array_options(decoding_plugin="pylibjpeg")
    try:
        try:
            arr = ds.pixel_array
        except Exception:
            if not preferred:
                raise
            ds.pixel_array_options(decoding_plugin="")  # any other installed plugin may still read it
            arr = ds.pixel_array
    except BaseException as e:  # anything from struct.error to a Rust PanicException (a BaseException)
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        hint = ""
        if decoder is not None and decoder.missing_dependencies:
            hint = "; if the stream is valid, another plugin may read it: " + "; ".join(
                decoder.missing_dependencies
            )
        raise InvalidDicomError(
            path,
            "decode_failed",
            f"{name} pixel data failed to decode ({type(e).__name__}: {_scrub(str(e), ds)}){hint}",
        ) from None
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    if arr.shape != shape:
        raise InvalidDicomError(
            path,
            "decode_failed",
            f"decoded pixels have shape {arr.shape}, the header says {'x'.join(map(str, shape))}",
        )
    return arr


def _percentiles(x: np.ndarray, cfg: ImageConfig) -> tuple[float, float]:
    lo, hi = np.percentile(x, cfg.clip_percentiles)
    return float(lo), float(hi)


def _window(ds: Dataset) -> tuple[str, float, float] | None:
    """The first VOI window as (function, center, width), None when absent or unusable."""
    center, width = header_value(ds, "WindowCenter"), header_value(ds, "WindowWidth")
    if center is None or width is None:
        return None
    c = to_float(center[0] if isinstance(center, MultiValue) else center)
    w = to_float(width[0] if isinstance(width, MultiValue) else width)
    func = (_text(ds, "VOILUTFunction") or "LINEAR").upper()
    if c is None or w is None or w <= (1 if func == "LINEAR" else 0):  # PS3.3 C.11.2.1.2: width >= 1
        return None
    return func, c, w


def _intensity(
    raw: np.ndarray, ds: Dataset, cfg: ImageConfig, path: str
) -> tuple[np.ndarray, float, float, bool, list[float]]:
    """Full-resolution values `v` (float32) and the values (a, b) that map to 0 and 1, plus VOI info.

    Rescale and linear windows are affine/clipping, so they are folded into (a, b) and the clip
    instead of being applied to every pixel; only a VOI LUT or a sigmoid window touches all pixels.
    """
    base = raw
    slope, intercept = 1.0, 0.0
    if header_value(ds, "ModalityLUTSequence"):
        base = apply_modality_lut(raw, ds)
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = to_float(header_value(ds, "RescaleSlope")) or 1.0  # absent, zero or junk: identity
        intercept = to_float(header_value(ds, "RescaleIntercept")) or 0.0
    if base.dtype.kind == "f":
        finite = np.isfinite(base)
        if not finite.any():
            raise InvalidDicomError(path, "empty_image", "every pixel is NaN or infinite")
        if not finite.all():
            base = np.where(finite, base, base[finite].min())
    step = max(1, int(math.sqrt(base.size / _PERCENTILE_SAMPLES)))
    sub = base[::step, ::step].astype(np.float32) * slope + intercept  # modality units

    window = _window(ds) if cfg.use_voi_lut else None
    if cfg.use_voi_lut and header_value(ds, "VOILUTSequence"):
        try:  # a VOI LUT takes integer modality values (PS3.3 C.11.2.1.1)
            sub_voi = apply_voi(np.rint(sub).astype(np.int64), ds).astype(np.float32)
            lo, hi = _percentiles(sub_voi, cfg)
            if lo < hi:
                full = np.rint(base.astype(np.float32) * slope + intercept).astype(np.int64)
                v = apply_voi(full, ds).astype(np.float32)
                # Modality values just inside the LUT's unsaturated span (exact for monotone LUTs).
                above, below = sub[sub_voi > lo], sub[sub_voi < hi]
                span = [(above if above.size else sub).min(), (below if below.size else sub).max()]
                return v, lo, hi, True, [float(x) for x in span]
        except Exception as e:  # a malformed LUT: fall back to the window or to none
            logger.debug("VOI LUT unusable (%s); falling back", type(e).__name__)
    if window is not None and window[0] == "SIGMOID":
        _, c, w = window
        sub_voi = 1 / (1 + np.exp(-4 * (sub - c) / w))
        lo, hi = _percentiles(sub_voi, cfg)
        if lo < hi:
            v = 1 / (1 + np.exp(-4 * ((base.astype(np.float32) * slope + intercept) - c) / w))
            inv = [c - w / 4 * math.log(1 / min(max(p, 1e-7), 1 - 1e-7) - 1) for p in (lo, hi)]
            return v.astype(np.float32), lo, hi, True, inv
    voi = False
    lo = hi = 0.0
    if window is not None and window[0] in ("LINEAR", "LINEAR_EXACT"):
        func, c, w = window
        half = w / 2 if func == "LINEAR_EXACT" else (w - 1) / 2
        center = c if func == "LINEAR_EXACT" else c - 0.5
        lo, hi = _percentiles(np.clip(sub, center - half, center + half), cfg)
        voi = lo < hi  # a window that flattens the image is ignored
    if not voi:
        lo, hi = _percentiles(sub, cfg)
        if not lo < hi:  # mostly-constant image: fall back to the full range
            lo, hi = sorted((float(base.min()) * slope + intercept, float(base.max()) * slope + intercept))
        if not lo < hi:
            raise InvalidDicomError(path, "empty_image", "every pixel has the same value")
    a, b = (lo - intercept) / slope, (hi - intercept) / slope  # back to stored units
    return base, a, b, voi, [lo, hi]  # stored values as decoded: _to_square clips them in their own type


def _inverted(ds: Dataset) -> bool:
    """True when low values display bright (MONOCHROME1, or MONOCHROME2 with an INVERSE presentation LUT)."""
    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    shape = (_text(ds, "PresentationLUTShape") or "").upper()
    return photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")


def _to_square(
    v: np.ndarray, a: float, b: float, inverted: bool, size: int, shape: tuple[int, int], level: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Clip `v` to [a, b], resize (longer side = size, aspect of `shape` kept), map a..b to 0..65535, pad centred.

    `shape` is the image's full-resolution (rows, cols); `v` may be its JPEG 2000 decode at
    1/2**`level` resolution.
    """
    rows, cols = shape
    scale = size / max(rows, cols)
    h, w = max(1, min(size, round(rows * scale))), max(1, min(size, round(cols * scale)))
    # clipped before resizing, so outliers do not bleed into neighbours
    if v.dtype in (np.uint8, np.uint16):  # stored integers: clip in place of a float copy (to whole units)
        v = np.clip(v, max(math.floor(min(a, b)), 0), min(math.ceil(max(a, b)), np.iinfo(v.dtype).max))
    else:
        v = np.clip(v.astype(np.float32, copy=False), min(a, b), max(a, b))
    if (h, w) != v.shape or level:
        from PIL import Image

        p = 1 << level
        # Reduced sample k sits on full-resolution pixel p*k (the wavelet's low-pass phase), not at the
        # centre of a p x p block; in Pillow's pixel-edge coordinates the full image then spans
        # [0.5 - 0.5/p, (n - 0.5)/p + 0.5], half a sample past the last one (hence the edge pad).
        box = (0.5 - 0.5 / p, 0.5 - 0.5 / p, (cols - 0.5) / p + 0.5, (rows - 0.5) / p + 0.5)
        if level:
            v = np.pad(v, ((0, 1), (0, 1)), mode="edge")
        # Pillow's bilinear filter widens with the scale factor (antialiased: torch's antialias=True gives
        # the same values to float precision). Shrinking by 6x or more it first box-averages by an
        # integer factor (reducing_gap=3): within 0.1 % of the exact filter and faster than torch on
        # 2-3k px radiographs. Pillow also keeps torch (~1 s to import) out of the decoding workers.
        image = Image.fromarray(np.ascontiguousarray(v))  # uint8/uint16 are mapped, not copied
        if image.mode != "F":
            image = image.convert("F")
        v = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0))
    y = (v.astype(np.float32) - a) / (b - a)  # affine: commutes with the resize, runs on the small image
    if inverted:
        y = 1.0 - y
    image = np.zeros((1, size, size), dtype=np.uint16)  # (C=1, H, W)
    y0, x0 = (size - h) // 2, (size - w) // 2
    image[0, y0 : y0 + h, x0 : x0 + w] = np.rint(np.clip(y, 0.0, 1.0) * 65535.0)
    return image, [y0, x0, y0 + h, x0 + w]


def read_image(
    path: str | os.PathLike, cfg: ImageConfig, limits: LimitsConfig | None = None
) -> tuple[DicomHeader, np.ndarray, dict[str, Any]]:
    """Read a file once: header, uint16 image (1, size, size) with high = dense, and image metadata.
    Nothing is decoded beyond `limits` (file size, inflated size, pixels)."""
    path = os.fspath(path)
    limits = limits or LimitsConfig()
    with quiet():
        ds = read_dataset(path, pixels=True, limits=limits)
        try:
            header = _header(ds, path)
        except Exception as e:  # defensive: _header tolerates bad values one by one
            raise InvalidDicomError(
                path, "unreadable_header", f"header values unusable ({type(e).__name__})"
            ) from None
        try:
            rows, cols = _check_pixel_module(ds, path, header, limits.max_pixels)
            reduced = None
            if cfg.j2k_reduce and _transfer_syntax(ds) in _J2K_SYNTAXES:
                reduced = _decode_j2k_reduced(ds, rows, cols, cfg.size)
            raw, reduction = reduced or (decode_pixels(ds, path, rows, cols), 0)
            v, a, b, voi, intensity_range = _intensity(raw, ds, cfg, path)
            inverted = _inverted(ds)
            image, box = _to_square(v, a, b, inverted, cfg.size, (rows, cols), reduction)
        except InvalidDicomError:
            raise
        except Exception as e:  # a LUT or value pydicom accepted but numpy cannot use, out of memory, ...
            raise InvalidDicomError(
                path, "decode_failed", f"the pixels could not be turned into an image ({type(e).__name__})"
            ) from None
    h, w = box[2] - box[0], box[3] - box[1]
    spacing_in, spacing_source = None, None
    for key, source in (
        ("pixel_spacing_mm", "PixelSpacing"),
        ("imager_pixel_spacing_mm", "ImagerPixelSpacing"),
    ):
        if header.safe[key]:
            spacing_in, spacing_source = header.safe[key], source
            break
    meta = {
        "orig_shape": [rows, cols],
        "spacing_in_mm": spacing_in,
        "spacing_out_mm": [spacing_in[0] * rows / h, spacing_in[1] * cols / w] if spacing_in else None,
        "spacing_source": spacing_source,  # ImagerPixelSpacing: at the detector, not magnification-corrected
        "valid_box": box,
        "voi_applied": bool(voi),
        "inverted": inverted,
        "intensity_range": [float(x) for x in intensity_range],
        "j2k_reduction": reduction,  # decoded at 1/2**r resolution (JPEG 2000 only; 0: full)
    }
    return header, image, meta
