"""CT series -> volumes: group slice files into series, order them in space, check that they form
one regular volume, convert to Hounsfield units, resample to a fixed spacing and size, window.

A series is one SeriesInstanceUID: either one file per slice (CT Image Storage) or one enhanced
multi-frame file (Enhanced CT Image Storage, frames described by functional groups). Slices are
ordered by their position along the slice normal (ImagePositionPatient . (row x column direction
cosines)), never by file name or InstanceNumber, which archives do not keep reliably.

A series that is not one regular volume raises `InvalidDicomError(path, reason, detail)`, the
path being the series' first file; `reason` is one of:

- `series_geometry`: a slice lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing.
- `series_orientation`: the slices do not share one orientation.
- `series_mixed_size`: the slices differ in Rows/Columns or PixelSpacing.
- `series_too_few_slices`: fewer slices than `prepare.volume.min_slices`.
- `series_duplicate_position`: two slices at the same position (e.g. two acquisitions in one series).
- `series_gap`: a step between neighbours larger than the tolerance allows: missing slices.
- `series_spacing`: steps smaller than the tolerance allows: slices are not evenly spaced.
- `over_limit`: slices x rows x columns beyond `prepare.limits.max_voxels` (or one slice beyond
  `max_pixels`), refused before any pixel is read.

Per-file failures (unreadable, truncated, undecodable) keep the reasons of `jepa_ray.ingest.header`.
Messages hold paths and numbers only, never header text.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from jepa_ray.config import LimitsConfig, VolumeConfig
from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.decode import decode_pixels
from jepa_ray.ingest.header import header_value, quiet, read_dataset, to_float

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class SliceRef:
    """Where one slice's pixels are (a file, and a frame for multi-frame files) and its geometry."""

    path: str
    frame: int | None
    rows: int
    cols: int
    orientation: tuple[float, ...]  # row then column direction cosines (6)
    position: tuple[float, float, float]  # ImagePositionPatient of the first pixel, mm
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns, mm
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class Volume:
    """A series as one array in Hounsfield units, slices ordered along the normal."""

    hu: np.ndarray  # (slices, rows, cols) float32
    spacing: tuple[float, float, float]  # mm: between slices, rows, columns
    paths: list[str] = field(default_factory=list)
    multi_frame: bool = False
    refs: list[SliceRef] = field(default_factory=list)  # the slices in the volume's order


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _geometry(path: str, where: str, orientation, position, spacing) -> tuple:
    o, p, s = _floats(orientation, 6), _floats(position, 3), _floats(spacing, 2)
    missing = [
        k
        for k, v in (("ImageOrientationPatient", o), ("ImagePositionPatient", p), ("PixelSpacing", s))
        if v is None
    ]
    if missing:
        raise InvalidDicomError(
            path,
            "series_geometry",
            f"{where}: {', '.join(missing)} missing or not numbers: no place in space",
        )
    if min(s) <= 0:
        raise InvalidDicomError(path, "series_geometry", f"{where}: PixelSpacing {s} is not positive")
    return o, p, s


def slice_refs(path: str | os.PathLike, limits: LimitsConfig | None = None) -> tuple[str, list[SliceRef]]:
    """(SeriesInstanceUID, the slices this file holds): one for a CT slice, every frame of an
    enhanced multi-frame CT. Reads the header only; a slice over `limits.max_pixels`, or a file whose
    frames hold more than `limits.max_voxels`, is refused before any pixel is read."""
    path = str(path)
    limits = limits or LimitsConfig()
    with quiet():
        ds = read_dataset(path, pixels=False, limits=limits)
    series = str(header_value(ds, "SeriesInstanceUID") or "")
    if not series:
        raise InvalidDicomError(path, "series_geometry", "no SeriesInstanceUID: the series is unknown")
    rows, cols = header_value(ds, "Rows"), header_value(ds, "Columns")
    if not rows or not cols:
        raise InvalidDicomError(path, "bad_geometry", "Rows or Columns missing or zero")
    frames = int(header_value(ds, "NumberOfFrames") or 1)
    if int(rows) * int(cols) > limits.max_pixels:
        raise InvalidDicomError(
            path,
            "over_limit",
            f"{rows}x{cols} pixels per slice, more than prepare.limits.max_pixels={limits.max_pixels}",
        )
    if frames * int(rows) * int(cols) > limits.max_voxels:
        raise InvalidDicomError(
            path,
            "over_limit",
            f"{frames} frames of {rows}x{cols}, more than prepare.limits.max_voxels={limits.max_voxels}",
        )
    if "PerFrameFunctionalGroupsSequence" in ds:
        return series, _frame_refs(ds, path, int(rows), int(cols), frames)
    o, p, s = _geometry(
        path,
        "the slice",
        header_value(ds, "ImageOrientationPatient"),
        header_value(ds, "ImagePositionPatient"),
        header_value(ds, "PixelSpacing"),
    )
    if frames > 1:
        raise InvalidDicomError(
            path,
            "series_geometry",
            f"{frames} frames without per-frame functional groups: no frame positions",
        )
    slope = to_float(header_value(ds, "RescaleSlope"))
    intercept = to_float(header_value(ds, "RescaleIntercept"))
    return series, [
        SliceRef(path, None, int(rows), int(cols), o, p, s, 1.0 if slope is None else slope, intercept or 0.0)
    ]


def _group(ds: Dataset, keyword: str, i: int, inner: str):
    """An item of a functional group, per frame when present there, else shared."""
    for seq_kw, index in (("PerFrameFunctionalGroupsSequence", i), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_kw)
        if seq is None or len(seq) <= index:
            continue
        item = seq[index]
        if keyword in item and len(item[keyword].value) and inner in item[keyword].value[0]:
            return item[keyword].value[0][inner].value
    return None


def _frame_refs(ds: Dataset, path: str, rows: int, cols: int, frames: int) -> list[SliceRef]:
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != frames:
        raise InvalidDicomError(
            path, "series_geometry", f"{len(per_frame)} per-frame functional groups for {frames} frames"
        )
    refs = []
    for i in range(frames):
        o, p, s = _geometry(
            path,
            f"frame {i + 1}",
            _group(ds, "PlaneOrientationSequence", i, "ImageOrientationPatient"),
            _group(ds, "PlanePositionSequence", i, "ImagePositionPatient"),
            _group(ds, "PixelMeasuresSequence", i, "PixelSpacing"),
        )
        slope = to_float(_group(ds, "PixelValueTransformationSequence", i, "RescaleSlope"))
        intercept = to_float(_group(ds, "PixelValueTransformationSequence", i, "RescaleIntercept"))
        refs.append(SliceRef(path, i, rows, cols, o, p, s, 1.0 if slope is None else slope, intercept or 0.0))
    return refs


def group_series(
    paths: Iterable[str | os.PathLike], limits: LimitsConfig | None = None
) -> tuple[dict[str, list[SliceRef]], list[InvalidDicomError]]:
    """Slices by SeriesInstanceUID, and the files that could not be read (with their reasons)."""
    series: dict[str, list[SliceRef]] = defaultdict(list)
    problems = []
    for path in paths:
        try:
            uid, refs = slice_refs(path, limits)
        except InvalidDicomError as e:
            problems.append(e)
            continue
        series[uid].extend(refs)
    return dict(series), problems


def order_slices(refs: list[SliceRef], cfg: VolumeConfig) -> tuple[list[SliceRef], float]:
    """The slices sorted along the normal and the step between them (mm), after checking that they
    are one regular volume (see the module docstring for the reasons)."""
    first = min(refs, key=lambda r: (r.path, r.frame or 0)).path
    if len(refs) < cfg.min_slices:
        raise InvalidDicomError(
            first,
            "series_too_few_slices",
            f"{len(refs)} slices, fewer than prepare.volume.min_slices={cfg.min_slices}",
        )
    o0 = np.array(refs[0].orientation)
    for r in refs:
        if np.abs(np.array(r.orientation) - o0).max() > cfg.orientation_tolerance:
            raise InvalidDicomError(
                r.path, "series_orientation", "its orientation differs from the series' first slice"
            )
        if (r.rows, r.cols) != (refs[0].rows, refs[0].cols) or not np.allclose(
            r.spacing, refs[0].spacing, rtol=1e-3
        ):
            raise InvalidDicomError(
                r.path,
                "series_mixed_size",
                f"{r.rows}x{r.cols} pixels of {r.spacing[0]:g}x{r.spacing[1]:g} mm; the series' first slice "
                f"has {refs[0].rows}x{refs[0].cols} of {refs[0].spacing[0]:g}x{refs[0].spacing[1]:g}",
            )
    normal = np.cross(o0[:3], o0[3:])
    if np.linalg.norm(normal) < 0.5:
        raise InvalidDicomError(first, "series_geometry", "the row and column directions are parallel")
    normal /= np.linalg.norm(normal)
    along = np.array([np.dot(r.position, normal) for r in refs])
    order = np.argsort(along, kind="stable")
    refs, along = [refs[i] for i in order], along[order]
    steps = np.diff(along)
    tiny = 1e-3 * min(refs[0].spacing)
    if (steps < tiny).any():
        k = int(np.argmax(steps < tiny))
        raise InvalidDicomError(
            refs[k + 1].path,
            "series_duplicate_position",
            f"two slices at {along[k]:.2f} mm along the normal: two acquisitions or a duplicated file",
        )
    step = float(np.median(steps))
    # a short step first: a missing slice only ever lengthens one
    if (steps < (1 - cfg.gap_tolerance) * step).any():
        k = int(np.argmin(steps))
        raise InvalidDicomError(
            refs[k].path,
            "series_spacing",
            f"a step of {steps[k]:.2f} mm after this slice where the series steps {step:.2f} mm: "
            "not evenly spaced",
        )
    if (steps > (1 + cfg.gap_tolerance) * step).any():
        k = int(np.argmax(steps))
        missing = round(steps[k] / step) - 1
        raise InvalidDicomError(
            refs[k].path,
            "series_gap",
            f"a step of {steps[k]:.2f} mm after this slice where the series steps {step:.2f} mm: "
            f"about {max(missing, 1)} slice(s) missing",
        )
    return refs, step


def assemble(refs: list[SliceRef], cfg: VolumeConfig, limits: LimitsConfig | None = None) -> Volume:
    """Read the pixels of an ordered, checked series into one HU volume (per-slice rescale); a series
    over `limits.max_voxels` is refused before any memory is set aside for it."""
    limits = limits or LimitsConfig()
    refs, step = order_slices(refs, cfg)
    rows, cols = refs[0].rows, refs[0].cols
    if len(refs) * rows * cols > limits.max_voxels:
        raise InvalidDicomError(
            refs[0].path,
            "over_limit",
            f"{len(refs)} slices of {rows}x{cols}, more than prepare.limits.max_voxels={limits.max_voxels}",
        )
    hu = np.empty((len(refs), rows, cols), np.float32)
    frames_of: dict[str, np.ndarray] = {}
    for i, r in enumerate(refs):
        if r.frame is None:
            with quiet():
                ds = read_dataset(r.path, pixels=True, limits=limits)
                pixels = decode_pixels(ds, r.path, rows, cols)
        else:
            if r.path not in frames_of:
                frames = int(max(x.frame for x in refs if x.path == r.path) + 1)
                with quiet():
                    ds = read_dataset(r.path, pixels=True, limits=limits)
                    data = decode_pixels(ds, r.path, rows, cols, frames=frames)
                frames_of[r.path] = data.reshape(frames, rows, cols)
            pixels = frames_of[r.path][r.frame]
        hu[i] = pixels.astype(np.float32) * r.slope + r.intercept
    return Volume(
        hu=hu,
        spacing=(step, *refs[0].spacing),
        paths=sorted({r.path for r in refs}),
        multi_frame=refs[0].frame is not None,
        refs=refs,
    )


def resample(volume: Volume, cfg: VolumeConfig, pad: float | None = None) -> np.ndarray:
    """Trilinear resampling to `cfg.spacing`, centred crop or pad (with `pad`, by default
    `cfg.pad_hu`) to `cfg.size`, in one pass: only the voxels that are kept are computed.
    (Z, Y, X) float32 in HU (or in the units of `volume.hu`: masks go through it too)."""
    import torch
    import torch.nn.functional as F

    coords, inside = [], []
    for n, src, dst, m in zip(volume.hu.shape, volume.spacing, cfg.spacing, cfg.size, strict=True):
        full = max(1, round(n * src / dst))  # the resampled length before cropping or padding
        start = (full - m) // 2 if full >= m else -((m - full) // 2)
        j = torch.arange(m, dtype=torch.float64) + start  # output voxels in the full resampled grid
        coords.append((2 * (j + 0.5) * (n / full) / n - 1).float())  # voxel centres, [-1, 1] over the source
        inside.append((j >= 0) & (j < full))
    grid = torch.stack(torch.meshgrid(*coords, indexing="ij")[::-1], dim=-1)  # (Z, Y, X, 3) as x, y, z
    src = torch.from_numpy(np.ascontiguousarray(volume.hu))[None, None]
    out = F.grid_sample(src, grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    keep = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    out[~keep] = cfg.pad_hu if pad is None else pad
    return out.numpy()


def fit(x: np.ndarray, size: tuple[int, ...], pad: float) -> np.ndarray:
    """Centre-crop or pad every axis of x to `size`."""
    out = np.full(size, pad, dtype=np.float32)
    src, dst = [], []
    for n, m in zip(x.shape, size, strict=True):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = x[tuple(src)]
    return out


def windows(hu: np.ndarray, cfg: VolumeConfig) -> np.ndarray:
    """One channel per CT window, each (centre, width) mapped linearly to [0, 1]: (C, Z, Y, X)."""
    out = np.empty((len(cfg.windows), *hu.shape), np.float32)
    for c, (centre, width) in enumerate(cfg.windows.values()):
        np.clip((hu - (centre - width / 2)) / width, 0.0, 1.0, out=out[c])
    return out


def read_volume(
    refs: list[SliceRef],
    cfg: VolumeConfig,
    on_volume: Callable[[Volume], None] | None = None,
    limits: LimitsConfig | None = None,
) -> tuple[np.ndarray, dict]:
    """A series' slices -> the windowed, fixed-size volume (C, Z, Y, X) float32 in [0, 1] and its
    metadata (spacing before and after, slices, windows). `on_volume` sees the assembled volume
    (HU, slices in order, `refs`) before it is resampled."""
    volume = assemble(refs, cfg, limits)
    if on_volume is not None:
        on_volume(volume)
    out = windows(resample(volume, cfg), cfg)
    meta = {
        "kind": "ct_volume",
        "slices": int(volume.hu.shape[0]),
        "source_shape": list(volume.hu.shape),
        "source_spacing_mm": [round(s, 4) for s in volume.spacing],
        "spacing_mm": list(cfg.spacing),
        "windows": {k: list(v) for k, v in cfg.windows.items()},
        "multi_frame": volume.multi_frame,
    }
    return out, meta
