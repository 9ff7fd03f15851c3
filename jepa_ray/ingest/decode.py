"""Decode a DICOM dataset's pixel data to its stored values, whatever its transfer syntax.

`decode_pixels` decodes with whichever pydicom plugin is installed (pylibjpeg first for JPEG 2000),
after checking that native pixel data is as long as the header says; `decode_image` first tries a
JPEG 2000 stream at the coarsest wavelet level the output size allows. Used by `jepa_ray.ingest.image` (2-D images) and `jepa_ray.ingest.series`
(CT slices). Failures raise `InvalidDicomError` (`truncated`, `decode_failed`) with the reasons
listed in `jepa_ray.ingest.header`; a decoder's message is kept only after `scrub`.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.header import header_value, scrub

logger = logging.getLogger(__name__)

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

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
    pixel = next(ds[k] for k in PIXEL_KEYWORDS if k in ds)
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
            f"{name} pixel data failed to decode ({type(e).__name__}: {scrub(str(e), ds)}){hint}",
        ) from None
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    if arr.shape != shape:
        raise InvalidDicomError(
            path,
            "decode_failed",
            f"decoded pixels have shape {arr.shape}, the header says {'x'.join(map(str, shape))}",
        )
    return arr


def decode_image(ds: Dataset, path: str, rows: int, cols: int, size: int | None) -> tuple[np.ndarray, int]:
    """A 2-D image's stored values and the level r they were decoded at (1/2**r resolution, 0: full).

    With `size`, a JPEG 2000 stream stops at the coarsest wavelet level whose longer side stays
    >= `size`; anything else, or a stream the reduced decode cannot read, is decoded in full.
    """
    reduced = None
    if size is not None and _transfer_syntax(ds) in _J2K_SYNTAXES:
        reduced = _decode_j2k_reduced(ds, rows, cols, size)
    return reduced or (decode_pixels(ds, path, rows, cols), 0)
