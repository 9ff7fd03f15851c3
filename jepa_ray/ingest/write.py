"""Shard writing: one webdataset `.tar` per planned shard, byte-for-byte deterministic, in the
format of `jepa_ray.shards.format` (decoding each study's image or CT volume on the way). Each finished shard gets a sidecar `_parts/<shard>.json` (counts, sha256, fingerprint of what went
in, quarantined inputs); `prepare` skips a shard whose sidecar fingerprint matches on a rerun.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jepa_ray.config import ImageConfig, LimitsConfig, StorageConfig, VolumeConfig
from jepa_ray.ingest.masks import mask_stats, read_masks, read_volume_masks
from jepa_ray.ingest.quarantine import dicom_record, unexpected_error
from jepa_ray.shards.format import SCHEMA_VERSION, dumps, encode_npy, encode_npz
from jepa_ray.storage import Store

logger = logging.getLogger(__name__)

PARTS_DIR = "_parts"


@dataclass
class SampleSpec:
    """Everything a shard task needs to write one sample (no raw identifier inside but the paths)."""

    key: str
    split: str
    # (absolute path to read, path relative to the input root for records), in order of preference:
    # the first image of the study that decodes is used. Absolute paths are never written out.
    dicoms: list[tuple[str, str]]
    ehr: dict[str, np.ndarray] | None  # the ehr.npz arrays (encoded by the shard task)
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "image"  # "image": one 2-D image of the study; "ct": the study's CT series as a volume
    masks: dict[str, str] | None = None  # DICOM path -> its ground-truth mask folder (ingest.masks)


def shard_fingerprint(shard: str, samples: list[SampleSpec], context: dict[str, Any]) -> str:
    """Hash of everything that decides a shard's bytes, except the pixels (file size + mtime stand in).
    Paths are hashed as UTF-8, a file name that is not UTF-8 as its own bytes (surrogate escapes)."""
    h = hashlib.sha256(dumps({"schema": SCHEMA_VERSION, "shard": shard, "context": context}))
    for s in samples:
        h.update(s.key.encode())
        for path, source in s.dicoms:
            st = os.stat(path)
            h.update(f"{source}|{st.st_size}|{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
        for path, folder in sorted(
            (s.masks or {}).items()
        ):  # only when masks are given: old shards keep theirs
            h.update(f"masks|{path}|{mask_stats(folder)}".encode("utf-8", "surrogateescape"))
        for name, arr in sorted((s.ehr or {}).items()):
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(dumps(s.meta))
    return h.hexdigest()


def decode_images(
    samples: list[list[tuple[str, str]]],
    image_cfg: ImageConfig,
    volume_cfg: VolumeConfig | None = None,
    kinds: list[str] | None = None,
    limits: LimitsConfig | None = None,
    masks: list[dict[str, str] | None] | None = None,
    allowed_masks: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Decode each sample's image: the first of its study's DICOMs that decodes, or, for a sample
    of kind "ct", its CT series as one volume (`_decode_ct`).

    Per sample: {"image": .npy bytes or None, "meta": image metadata, "quarantine": records of the
    files that failed, "skipped": records of the study's other images, left out}, and "mask"
    (mask.npz bytes) when `masks` (per sample, DICOM path -> mask folder) has the chosen image's.
    No exception escapes: an unexpected one quarantines the file (or the CT study) it came from,
    by type only (its message could quote header text).
    """
    from jepa_ray.errors import InvalidDicomError
    from jepa_ray.ingest.image import read_image

    out: list[dict[str, Any]] = []
    masks = masks or [None] * len(samples)
    for dicoms, kind, folders in zip(samples, kinds or ["image"] * len(samples), masks, strict=True):
        if kind == "ct":
            try:
                out.append(_decode_ct(dicoms, volume_cfg, limits, folders, allowed_masks))
            except Exception as e:  # a bug or an input no check foresaw: this study only
                out.append(no_image([unexpected_error(source, e, "this CT study") for _, source in dicoms]))
            continue
        res = no_image()
        for path, source in dicoms:
            if res["image"] is not None:
                res["skipped"].append(
                    {
                        "input": source,
                        "reason": "extra_image_in_study",
                        "detail": "one image per study is kept (frontal view preferred)",
                    }
                )
                continue
            try:
                header, image, image_meta = read_image(path, image_cfg, limits)
            except InvalidDicomError as e:
                res["quarantine"].append(dicom_record(source, e.reason, e.detail))
                continue
            except Exception as e:  # a bug or an input no check foresaw: this file only
                res["quarantine"].append(unexpected_error(source, e, "this file"))
                continue
            res["image"] = encode_npy(image)
            res["meta"] = {"image": image_meta, "dicom": header.safe}
            if folders and path in folders:
                _add_masks(res, folders[path], source, image_meta, image_cfg.size, limits, allowed_masks)
        out.append(res)
    return out


def _add_masks(res, folder, source, image_meta, size, limits, allowed) -> None:
    """The chosen image's masks into res["mask"] (names in meta.masks); a mask that cannot be used
    is quarantined on its own, the image kept."""
    from jepa_ray.errors import InvalidDicomError

    try:
        planes, names = read_masks(
            folder,
            tuple(image_meta["orig_shape"]),
            image_meta["valid_box"],
            size,
            (limits or LimitsConfig()).max_pixels,
            allowed,
        )
    except InvalidDicomError as e:
        res["quarantine"].append({**dicom_record(f"{source} (masks)", e.reason, e.detail), "kind": "mask"})
        return
    if names:
        res["mask"] = encode_npz({"masks": planes})
        res["meta"]["masks"] = names


def no_image(quarantine: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A sample's decoding result without an image (yet): its quarantined files, none skipped."""
    return {"image": None, "meta": {}, "quarantine": quarantine or [], "skipped": []}


def _decode_ct(
    dicoms: list[tuple[str, str]],
    cfg: VolumeConfig | None,
    limits: LimitsConfig | None = None,
    folders: dict[str, str] | None = None,
    allowed_masks: set[str] | None = None,
) -> dict[str, Any]:
    """A CT study -> the windowed volume (C, Z, Y, X) float16 of its largest series; the other
    series are skipped, a series that is not one regular volume is quarantined (one record, the
    reason of `jepa_ray.ingest.series`), and so is every file that cannot be read. With `folders`
    (slice path -> mask folder), the series' masks go through the volume's resampling into
    res["mask"] (`ingest.masks.read_volume_masks`); masks that cannot be used are quarantined on
    their own, the volume kept."""
    from jepa_ray.errors import InvalidDicomError
    from jepa_ray.ingest.header import read_header
    from jepa_ray.ingest.series import group_series, read_volume

    res = no_image()
    source = dict(dicoms)
    if cfg is None or not cfg.enabled:
        res["skipped"] = [
            {
                "input": src,
                "reason": "ct_series_not_ingested",
                "detail": "a CT series slice: set prepare.volume.enabled=true to ingest CT series as volumes",
            }
            for _, src in dicoms
        ]
        return res
    series, problems = group_series((path for path, _ in dicoms), limits)
    res["quarantine"] += [dicom_record(source[e.path], e.reason, e.detail) for e in problems]
    ranked = sorted(series.values(), key=lambda refs: (-len(refs), min(r.path for r in refs)))
    for refs in ranked[1:]:
        res["skipped"] += [
            {
                "input": source[p],
                "reason": "extra_series_in_study",
                "detail": "one CT series per study is kept (the one with the most slices)",
            }
            for p in sorted({r.path for r in refs})
        ]
    if not ranked:
        return res
    mask: dict[str, Any] = {}

    def masks_of(volume) -> None:  # while the assembled volume (slice order, spacing) is at hand
        if not folders or not any(r.path in folders for r in volume.refs):
            return
        try:
            mask["planes"], mask["names"] = read_volume_masks(
                folders, volume, cfg, (limits or LimitsConfig()).max_pixels, allowed_masks
            )
        except InvalidDicomError as e:
            src = source[volume.refs[0].path]
            mask["problem"] = {**dicom_record(f"{src} (masks)", e.reason, e.detail), "kind": "mask"}

    try:
        volume, meta = read_volume(ranked[0], cfg, on_volume=masks_of, limits=limits)
    except InvalidDicomError as e:
        files = sorted({r.path for r in ranked[0]})
        detail = f"{e.detail} (a series of {len(files)} files, all left out)"
        res["quarantine"].append({**dicom_record(source[e.path], e.reason, detail), "count": len(files)})
        return res
    res["image"] = encode_npy(volume.astype(np.float16))
    res["meta"] = {"image": meta, "dicom": read_header(ranked[0][0].path, limits).safe}
    if "problem" in mask:
        res["quarantine"].append(mask["problem"])
    elif mask.get("names"):
        res["mask"] = encode_npz({"masks": mask["planes"]})
        res["meta"]["masks"] = mask["names"]
    return res


class TarWriter:
    """webdataset's tar layout (`KEY.EXT` members, sorted per sample), byte for byte as `webdataset.TarWriter`
    writes it with user/group "jepa-ray", mode 0o444, mtime 0 and no encoder.

    Written here, with `tarfile` alone, so that decoding workers never import webdataset, which
    imports torch (~1 s per fresh worker process).
    """

    def __init__(self, fileobj: Any) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w|")  # noqa: SIM115 - closed by close()

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            data = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0.0, 0o444
            info.uname = info.gname = "jepa-ray"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


class _Hashing:
    """A write-only file wrapper that hashes what passes through (no second read of the shard)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def write_shard(
    name: str,
    split: str,
    fingerprint: str,
    samples: list[SampleSpec],
    decoded: list[dict[str, Any]],
    out_url: str,
    storage: StorageConfig,
) -> dict[str, Any]:
    """Write one shard atomically and its sidecar; return the sidecar record."""
    store = Store(out_url, storage)
    counts: Counter[str] = Counter()
    quarantine: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    labels: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    fd, tmp = store.staging_file(f"{name}.tar")
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Hashing(raw)
            writer = TarWriter(f)
            for spec, dec in zip(samples, decoded, strict=True):
                image = dec["image"]
                quarantine.extend(dec["quarantine"])
                skipped.extend(dec["skipped"])
                if image is None and spec.ehr is None:
                    continue  # the image was all this sample had, and it is quarantined
                meta = dict(spec.meta)
                meta["has_image"] = image is not None
                meta["has_ehr"] = spec.ehr is not None
                meta.update(dec["meta"])
                sample: dict[str, Any] = {"__key__": spec.key, "meta.json": dumps(meta)}
                if image is not None:
                    sample["image.npy"] = image
                if dec.get("mask") is not None:  # ground truth for evaluation; training never reads it
                    sample["mask.npz"] = dec["mask"]
                    counts["masks"] += 1
                if spec.ehr is not None:
                    sample["ehr.npz"] = encode_npz(spec.ehr)
                writer.write(sample)
                counts["samples"] += 1
                counts["image"] += image is not None
                counts["volume"] += dec["meta"].get("image", {}).get("kind") == "ct_volume"
                counts["ehr"] += spec.ehr is not None
                counts["paired"] += image is not None and spec.ehr is not None
                sites[meta.get("site", "site-unknown")] += 1
                for label, value in (meta.get("labels") or {}).items():
                    labels[label] += bool(value)
            writer.close()
        sha, size = f.sha, f.size
        store.put_file(tmp, f"{name}.tar")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    record = {
        "name": f"{name}.tar",
        "split": split,
        "fingerprint": fingerprint,
        "samples": counts["samples"],
        "image": counts["image"],
        "ehr": counts["ehr"],
        "paired": counts["paired"],
        "volume": counts["volume"],
        "masks": counts["masks"],
        "bytes": size,
        "sha256": sha.hexdigest(),
        "sites": dict(sites),
        "label_positives": dict(labels),
        "quarantine": quarantine,
        "skipped": skipped,
    }
    store.write_bytes(f"{PARTS_DIR}/{name}.json", dumps(record))
    return record


def read_sidecar(store: Store, name: str) -> dict[str, Any] | None:
    """A shard's sidecar, or None when missing or unreadable (the shard is then rewritten)."""
    try:
        return json.loads(store.read_bytes(f"{PARTS_DIR}/{name}.json"))
    except Exception:
        return None
