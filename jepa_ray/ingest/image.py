"""The fixed-size, normalised single-channel image of a DICOM file: `read_image`.

A file is parsed once (`jepa_ray.ingest.header`), its pixel module checked (one frame of grey
pixels, within `prepare.limits.max_pixels`), its pixels decoded (`jepa_ray.ingest.decode`) and
mapped to display intensities: the modality LUT or rescale, the VOI LUT or window, a percentile
clip, MONOCHROME1 and INVERSE presentation inverted so that high is dense. The image is then
resized (longer side = size, aspect kept), scaled to uint16 and padded centred to (1, size, size).
Failures raise `InvalidDicomError` with the reasons listed in `jepa_ray.ingest.header`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

from jepa_ray.config import ImageConfig, LimitsConfig
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.decode import PIXEL_KEYWORDS, decode_image
from jepa_ray.ingest.header import (
    DicomHeader,
    dataset_header,
    header_text,
    header_value,
    quiet,
    read_dataset,
    to_float,
)

logger = logging.getLogger(__name__)

_PERCENTILE_SAMPLES = 2**14


def _check_pixel_module(ds: Dataset, path: str, header: DicomHeader, max_pixels: int) -> tuple[int, int]:
    """Raise for what `read_image` cannot use; return (rows, cols)."""
    safe = header.safe
    if not any(k in ds for k in PIXEL_KEYWORDS):
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
    func = (header_text(ds, "VOILUTFunction") or "LINEAR").upper()
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
    photometric = (header_text(ds, "PhotometricInterpretation") or "").upper()
    shape = (header_text(ds, "PresentationLUTShape") or "").upper()
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
        header = dataset_header(ds, path)
        try:
            rows, cols = _check_pixel_module(ds, path, header, limits.max_pixels)
            raw, reduction = decode_image(ds, path, rows, cols, cfg.size if cfg.j2k_reduce else None)
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
