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
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jepa_ray.errors import InvalidDicomError

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
    if not legend.is_file():
        return None
    try:
        doc = json.loads(legend.read_text())
        return (
            {str(k) for key in ("structures", "ct_structures") for k in doc.get(key, {})}
            if isinstance(doc, dict)
            else set()
        )
    except (ValueError, TypeError, AttributeError):
        return set()  # a legend that cannot be read admits nothing rather than everything


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
    InvalidDicomError (reasons mask_unreadable, mask_shape_mismatch, mask_too_large) otherwise."""
    from PIL import Image

    rows, cols = shape
    y0, x0, y1, x1 = box
    names, planes = [], []
    for path in sorted(Path(folder).glob("*.png")):
        name = path.stem
        if not NAME.match(name) or (allowed is not None and name not in allowed):
            continue
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise InvalidDicomError(folder, "mask_too_large", f"a mask of {w} x {h} pixels")
                if (h, w) != (rows, cols):
                    raise InvalidDicomError(
                        folder, "mask_shape_mismatch", f"a mask of {h} x {w} for an image of {rows} x {cols}"
                    )
                inside = np.asarray(im.convert("L")) > 0
        except InvalidDicomError:
            raise
        except Exception as e:  # a corrupt or hostile file: its type only
            raise InvalidDicomError(
                folder, "mask_unreadable", f"a mask cannot be read ({type(e).__name__})"
            ) from None
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


def mask_stats(folder: str) -> str:
    """Sizes and mtimes of a mask folder's PNGs (what decides whether a shard is rewritten)."""
    import os

    parts = []
    for path in sorted(Path(folder).glob("*.png")):
        st = os.stat(path)
        parts.append(f"{path.name}|{st.st_size}|{st.st_mtime_ns}")
    return ";".join(parts)
