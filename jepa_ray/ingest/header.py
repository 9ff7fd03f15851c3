"""Open a DICOM file safely and read its allowlisted header.

`read_dataset` parses a file once, within `prepare.limits` (its size on disk, and the inflated size
of a deflate-compressed dataset, counted in bounded steps before pydicom inflates it);
`read_header` reads the header only, into a `DicomHeader`: the raw identifiers (kept in memory,
never written) and the allowlisted `safe` metadata. The pixels are decoded by
`jepa_ray.ingest.decode` and made into the fixed-size image by `jepa_ray.ingest.image`.

Every failure of a DICOM read (here, in `jepa_ray.ingest.decode` or `jepa_ray.ingest.image`)
raises `InvalidDicomError(path, reason, detail)`; `reason` is one of:

- `unreadable_file`: the file cannot be opened (missing, permissions, a directory).
- `not_regular_file`: a named pipe, socket or device: never read (`prepare` does not list them).
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
decoder messages are included only after `scrub` has removed every non-allowlisted text value of
the header, and pydicom's own warnings (which can echo element values) are kept out of logs and
stderr while `quiet` is in effect.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import re
import stat
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any, BinaryIO

import pydicom
import pydicom.errors
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.uid import UID

from jepa_ray.config import LimitsConfig
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.listing import entry_kind

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


def _open_regular(path: str) -> BinaryIO:
    """`path` opened for reading, if it is a regular file (a folder fails to open). Opened without
    blocking and checked on the open descriptor: a named pipe would otherwise block the open until
    something writes to it, and a device could be read forever."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    try:
        f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | nonblocking))  # noqa: SIM115
    except OSError as e:
        raise InvalidDicomError(path, "unreadable_file", f"cannot open the file: {e.strerror}") from None
    mode = os.fstat(f.fileno()).st_mode
    if stat.S_ISREG(mode):
        if nonblocking:
            os.set_blocking(f.fileno(), True)
        return f
    f.close()
    raise InvalidDicomError(path, "not_regular_file", f"{entry_kind(mode)}, not a regular file: never read")


def read_dataset(path: str, pixels: bool, limits: LimitsConfig | None = None) -> Dataset:
    """dcmread `path` once (with or without pixels); every failure becomes InvalidDicomError. Files
    over `limits` (size on disk, inflated size of a deflated dataset) are refused before parsing."""
    limits = limits or LimitsConfig()
    f = _open_regular(path)
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


def header_text(ds: Dataset, keyword: str) -> str | None:
    """The element's value as stripped text, or None when absent, empty or unconvertible."""
    value = header_value(ds, keyword)
    return (str(value).strip() or None) if value is not None else None


def _to_int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        number = to_float(value)  # "1.0" is a valid IS for pydicom
        return int(number) if number is not None and number.is_integer() else None


def to_float(value: Any) -> float | None:
    """`value` as a finite float, or None."""
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
        raw = header_text(ds, date_kw)
        day = _parse_date(raw) if raw else None
        if day is None:
            continue
        if time_kw is None:  # a DT: YYYYMMDDHHMMSS.FFFFFF&ZZXX
            tod = _parse_time(re.split(r"[+&-]", raw.strip()[8:])[0]) if len(raw.strip()) > 8 else None
        else:
            raw_time = header_text(ds, time_kw)
            tod = _parse_time(raw_time) if raw_time else None
        return datetime.combine(day, tod or time())
    return None


def _header(ds: Dataset, path: str) -> DicomHeader:
    """The identifiers and the allowlisted `safe` values of a parsed dataset."""
    meta = getattr(ds, "file_meta", None)
    safe: dict[str, Any] = {}
    for keyword, (key, kind) in _SAFE_FIELDS.items():
        source = meta if keyword == "TransferSyntaxUID" else ds
        safe[key] = _safe_value(header_value(source, keyword) if source is not None else None, kind, keyword)
    if safe["number_of_frames"] is None and safe["rows"] is not None and "NumberOfFrames" not in ds:
        safe["number_of_frames"] = 1
    return DicomHeader(
        path=path,
        patient_id=header_text(ds, "PatientID"),
        study_uid=header_text(ds, "StudyInstanceUID"),
        series_uid=header_text(ds, "SeriesInstanceUID"),
        sop_uid=header_text(ds, "SOPInstanceUID"),
        study_time=_study_time(ds),
        institution=header_text(ds, "InstitutionName"),
        safe=safe,
    )


def dataset_header(ds: Dataset, path: str) -> DicomHeader:
    """The `DicomHeader` of a dataset `read_dataset` returned; InvalidDicomError when its values
    cannot be used at all."""
    try:
        return _header(ds, path)
    except Exception as e:  # defensive: _header tolerates bad values one by one
        raise InvalidDicomError(
            path, "unreadable_header", f"header values unusable ({type(e).__name__})"
        ) from None


def read_header(path: str | os.PathLike, limits: LimitsConfig | None = None) -> DicomHeader:
    """Read the header only (no pixels); InvalidDicomError when the file is not a readable DICOM."""
    path = os.fspath(path)
    with quiet():
        return dataset_header(read_dataset(path, pixels=False, limits=limits), path)


def scrub(text: str, ds: Dataset) -> str:
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
