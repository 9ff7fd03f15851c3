"""Ground-truth structure masks from an annotation export, carried into shards for evaluation only.

The convention read (`prepare --masks DIR`) is the one `jepa-ray synth` writes and most radiograph
segmentation sets use: one PNG per structure and image, nonzero inside, in the DICOM's own pixel
grid (rows x columns), at `DIR/<the image's path under --dicom, without .dcm>/<structure>.png`.
Structures overlap in a projection (heart over lung), so each is its own binary mask.

A mask goes through the image's geometry (`jepa_ray.ingest.image`: the resize that keeps the
aspect, the centred padding) and is stored in the sample as `mask.npz` (`masks`: uint8 0/1,
(structures, S, S); the names in `meta.masks`). Training never reads it. Only the pixels of a PNG
are read (its text chunks never); a structure's name, which becomes a column of the evaluation,
must look like one (`[a-z][a-z0-9_]*`, at most 40 characters) and, when the export has a
`structures.json` legend, be listed there; other files are left out. A mask that cannot be used
(unreadable, not the image's size, too large) is quarantined on its own: the image is kept.

A mask folder is listed as `--dicom` is (`jepa_ray.ingest.listing`): links are followed, and a
structure's entry that is not a regular file (a named pipe, which would block whoever opens it; a
link that leads nowhere) or a folder that cannot be listed is never opened and makes the image's
masks unusable, with the listing's reason. Two names for one PNG are two structures.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from jepa_ray.errors import InvalidDicomError
from jepa_ray.ingest.listing import Listing, list_files

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
LEGEND = "structures.json"


def mask_dirs(dicom_root: Path, masks_root: Path, paths: list[str]) -> dict[str, str]:
    """{DICOM path: its mask folder} for the files that have one."""
    out = {}
    for p in paths:
        path = Path(p)
        rel = path.relative_to(dicom_root) if dicom_root.is_dir() else Path(path.name)
        folder = masks_root / (rel.with_suffix("") if rel.suffix.lower() == ".dcm" else rel)
        if folder.is_dir():
            out[p] = str(folder)
    return out


def allowed_names(masks_root: Path) -> set[str] | None:
    """The structures a legend lists (None: no legend, any well-formed name)."""
    legend = masks_root / LEGEND
    if not os.path.lexists(legend):
        return None
    if not legend.is_file():  # a named pipe, a link that leads nowhere: never opened
        logger.warning("%s is not a regular file: no mask structure is admitted", legend)
        return set()
    try:
        doc = json.loads(legend.read_text())
        return (
            {str(k) for key in ("structures", "ct_structures") for k in doc.get(key, {})}
            if isinstance(doc, dict)
            else set()
        )
    except (ValueError, TypeError, AttributeError):
        return set()  # a legend that cannot be read admits nothing rather than everything


MAX_STRUCTURES = 64  # structures per image or volume: more is not an annotation export


def _list(folder: str | Path) -> Listing:
    """The PNGs under a mask folder, and the entries not read (`jepa_ray.ingest.listing`)."""
    try:
        return list_files(folder, suffix=".png")
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise InvalidDicomError(
            str(folder), "unreadable_folder", f"cannot list the mask folder ({why}): its masks are left out"
        ) from None


def _structures(folder: Path, allowed: set[str] | None) -> dict[str, Path]:
    """{structure: its PNG} of a mask folder (its own files, not its subfolders'), names checked
    (see the module docstring). A structure's entry that cannot be read raises InvalidDicomError
    with the listing's reason (not_regular_file, unreadable_file; unreadable_folder for the folder)."""
    folder = Path(folder)
    listing = _list(folder)

    def structure(path: str) -> str | None:
        name = Path(path).stem
        mine = os.path.dirname(path) == str(folder)
        return name if mine and NAME.match(name) and (allowed is None or name in allowed) else None

    found = {name: Path(p) for p in listing.files if (name := structure(p))}
    for u in listing.unread:
        name = structure(u.path) if u.what == "file" else None
        if name is None:  # not a structure of this folder: left out, never opened
            continue
        if u.quarantined:
            raise InvalidDicomError(str(folder), u.reason, f"{name}.png: {u.detail}")
        found[name] = Path(u.same_as or u.path)  # a second name for a PNG read under its first
    found = dict(sorted(found.items()))
    if len(found) > MAX_STRUCTURES:
        raise InvalidDicomError(
            str(folder), "mask_too_many", f"{len(found)} structures, more than {MAX_STRUCTURES}"
        )
    return found


def _read_png(path: Path, folder: str, shape: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A mask PNG's pixels as bool (rows, cols), nonzero inside; its size must be `shape`."""
    from PIL import Image

    rows, cols = shape
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise InvalidDicomError(folder, "mask_too_large", f"a mask of {w} x {h} pixels")
            if (h, w) != (rows, cols):
                raise InvalidDicomError(
                    folder, "mask_shape_mismatch", f"a mask of {h} x {w} for an image of {rows} x {cols}"
                )
            return np.asarray(im.convert("L")) > 0
    except InvalidDicomError:
        raise
    except Exception as e:  # a corrupt or hostile file: its type only
        raise InvalidDicomError(
            folder, "mask_unreadable", f"a mask cannot be read ({type(e).__name__})"
        ) from None


def read_masks(
    folder: str,
    shape: tuple[int, int],
    box: list[int],
    size: int,
    max_pixels: int,
    allowed: set[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(uint8 0/1 masks (structures, size, size) in the stored image's grid, their names).
    `shape` is the DICOM's (rows, cols), `box` the image's valid box in the stored square.
    InvalidDicomError (reasons mask_unreadable, mask_shape_mismatch, mask_too_large,
    mask_too_many) otherwise."""
    from PIL import Image

    rows, cols = shape
    y0, x0, y1, x1 = box
    names, planes = [], []
    for name, path in _structures(Path(folder), allowed).items():
        inside = _read_png(path, folder, shape, max_pixels)
        # the image's resize (bilinear over the whole grid, aspect kept), then the centred padding
        small = Image.fromarray(inside.astype(np.float32)).resize(
            (x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=(0, 0, cols, rows), reducing_gap=3.0
        )
        plane = np.zeros((size, size), np.uint8)
        plane[y0:y1, x0:x1] = np.asarray(small) >= 0.5
        names.append(name)
        planes.append(plane)
    if not planes:
        return np.zeros((0, size, size), np.uint8), []
    return np.stack(planes), names


def slice_folder(folders: dict[str, str], path: str, frame: int | None) -> Path | None:
    """The mask folder of one slice: its file's folder, or for a frame of a multi-frame file the
    folder's `frame-<n>/` (n from 1, DICOM's frame numbering); None when the export has none."""
    folder = folders.get(path)
    if folder is None:
        return None
    if frame is None:
        return Path(folder)
    sub = Path(folder) / f"frame-{frame + 1}"
    return sub if sub.is_dir() else None


def read_volume_masks(
    folders: dict[str, str],
    volume,
    cfg,
    max_pixels: int,
    allowed: set[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(uint8 0/1 masks (structures, Z, Y, X) in the stored volume's grid, their names) of a CT
    series whose slices each have a mask folder (`folders`: DICOM path -> folder). `volume` is the
    assembled `series.Volume` (its ordered `refs`, shape and spacing); every mask goes through the
    volume's own resampling, crop and padding (`series.resample`), a voxel inside when at least half
    of it is. A structure a slice's folder lacks is empty on that slice (exports often write only
    the slices a structure touches); a slice without a folder makes the masks unusable
    (`mask_incomplete`): an unannotated slice is not known to be empty. One structure's volume is in
    memory at a time."""
    from jepa_ray.ingest.series import Volume, resample

    refs = volume.refs
    slices = [slice_folder(folders, r.path, r.frame) for r in refs]
    missing = sum(s is None for s in slices)
    first = str(next((s for s in slices if s is not None), refs[0].path))
    if missing:
        raise InvalidDicomError(
            first,
            "mask_incomplete",
            f"{missing} of the series' {len(refs)} slices have no mask folder: the masks are left out",
        )
    per_slice = [_structures(s, allowed) for s in slices]
    names = sorted({n for found in per_slice for n in found})
    if len(names) > MAX_STRUCTURES:
        raise InvalidDicomError(
            first, "mask_too_many", f"{len(names)} structures, more than {MAX_STRUCTURES}"
        )
    shape = volume.hu.shape[1:]
    planes = []
    for name in names:
        stack = np.zeros(volume.hu.shape, np.float32)
        for k, found in enumerate(per_slice):
            if name in found:
                stack[k] = _read_png(found[name], str(slices[k]), shape, max_pixels)
        planes.append(resample(Volume(stack, volume.spacing), cfg, pad=0.0) >= 0.5)
    if not planes:
        return np.zeros((0, *cfg.size), np.uint8), []
    return np.stack(planes).astype(np.uint8), names


def mask_stats(folder: str) -> str:
    """Sizes and mtimes of a mask folder's PNGs, and the reasons of the entries not read (what
    decides whether a shard is rewritten). Nothing is opened."""
    try:
        listing = _list(folder)
    except InvalidDicomError as e:
        return e.reason
    parts = []
    for path in sorted(map(Path, listing.files)):  # frame-<n>/ of a multi-frame file too
        st = os.stat(path)
        parts.append(f"{path.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}")
    parts += [f"{Path(u.path).relative_to(folder)}|{u.reason}" for u in listing.unread]
    return ";".join(parts)
