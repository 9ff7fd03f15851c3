"""Raw shard samples to training inputs, one batch at a time (numpy + torch on the CPU).

`transform_batch` is the whole per-batch work of the pipeline: decode the stored arrays, crop,
resize and jitter the images as a batch, turn the EHR into fixed-size token arrays, and draw each
sample's masks. Ray Data runs it inside `map_batches`; the `webdataset` + `DataLoader` baseline of
`benchmarks/bench_ingest.py` runs the very same function, so the two differ only in how bytes move.

A batch in: `key`, `shard` (str), `image` (.npy bytes or None), `ehr` (.npz bytes or None), `meta`
(.json bytes). A batch out (B samples, S = image_size, N = (S/patch)^2 patches, L EHR tokens):

    key (B,) str · meta (B,) str (the sample's meta.json)
    image (B, 1, S, S) float32, normalised; zeros where has_image is False. With
        pipeline.dims=3: (B, C, Z, Y, X), one channel per CT window of the shards, Z/Y/X =
        volume_size, N = the number of tubelets
    With pipeline.dims=mixed: image (B, 1, S, S) radiographs, volume (B, C, Z, Y, X) CT volumes
        (zeros where the sample holds the other kind), is_volume (B,) bool; N = the larger grid's
        patches; a sample's masks use only the slots of its own grid (the first Y*X or Z*Y*X)
    has_image, has_ehr (B,) bool
    ehr_code, ehr_time, ehr_value, ehr_value_present, ehr_valid (B, L): one token per static
        numeric feature, per static categorical feature, per static code and per event, in that
        order (`EhrLayout`); code = vocabulary id (events, static codes) or category id (0 missing,
        1 unknown); value = standardised (numeric features; event values per code, clipped to ±5),
        0 where absent; time = days before the index (events; >= 0). A missing numeric value is
        still a token (value_present False); absent static codes and events are padding.
    policy (B,) int8 (see masking.py) · img_ctx (B, N) bool · img_tgt (B, M, N) bool
    ehr_ctx, ehr_tgt (B, L) bool
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jepa_ray.config import PipelineConfig
from jepa_ray.errors import ShardError
from jepa_ray.model.masks import sample_masks
from jepa_ray.shards.format import decode_npy, decode_npz

_VALUE_CLIP = 5.0


@dataclass
class FeatureSpec:
    """What the manifest says about the features: sizes for the model, statistics for normalising."""

    stored_size: int  # side of the images in the shards
    vocab_size: int
    code_mean: np.ndarray  # (V,) per code id; 0 for codes without numeric values
    code_std: np.ndarray  # (V,) per code id; 1 for codes without numeric values
    num_names: list[str]
    num_mean: np.ndarray  # (n_num,)
    num_std: np.ndarray  # (n_num,)
    cat_names: list[str]
    cat_sizes: list[int]  # embedding rows per categorical feature (missing + unknown + values)
    label_names: list[str] = field(default_factory=list)
    stored_volume: tuple[int, int, int] | None = None  # (Z, Y, X) of the CT volumes, if any
    volume_channels: int = 0  # CT windows stored per volume
    images_2d: int = 0  # radiographs in the shard set
    volumes: int = 0  # CT volumes in the shard set

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> FeatureSpec:
        vocab = manifest["ehr"]
        codes = vocab["codes"]
        mean, std = np.zeros(len(codes), np.float32), np.ones(len(codes), np.float32)
        for i, code in enumerate(codes):
            stats = vocab["code_stats"].get(code)
            if stats:
                mean[i], std[i] = stats["mean"], stats["std"] if stats["std"] > 1e-6 else 1.0
        num = vocab["static_numeric"]
        counts = manifest.get("counts", {})
        return cls(
            stored_size=int(manifest["image"]["size"]),
            vocab_size=len(codes),
            code_mean=mean,
            code_std=std,
            num_names=[f["name"] for f in num],
            num_mean=np.array([f["mean"] for f in num], np.float32),
            num_std=np.array([f["std"] if f["std"] > 1e-6 else 1.0 for f in num], np.float32),
            cat_names=[f["name"] for f in vocab["static_categorical"]],
            cat_sizes=[len(f["values"]) + 2 for f in vocab["static_categorical"]],
            label_names=list(vocab.get("labels", [])),
            stored_volume=tuple(manifest["volume"]["size"]) if manifest.get("volume") else None,
            volume_channels=len(manifest["volume"]["channels"]) if manifest.get("volume") else 0,
            images_2d=int(counts.get("image", 0)) - int(counts.get("volume", 0)),
            volumes=int(counts.get("volume", 0)),
        )

    def model_dims(self, cfg: PipelineConfig) -> dict[str, Any]:
        """The input sizes a model needs to consume this pipeline's batches; ConfigError when the
        shards hold no image of the kind `pipeline.dims` asks for (and some of the other)."""
        from jepa_ray.errors import ConfigError

        if cfg.dims == 3 and not self.volumes and self.images_2d:
            raise ConfigError(
                "pipeline.dims=3 trains on CT volumes, but these shards hold only 2-D images: prepare "
                "a CT cohort with prepare.volume.enabled=true, or train with pipeline.dims=2"
            )
        if cfg.dims == 2 and self.volumes and not self.images_2d:
            raise ConfigError(
                f"these shards hold {self.volumes} CT volume(s) and no 2-D image: train on them with "
                "pipeline.dims=3 (pipeline.volume_size, pipeline.tubelet)"
            )
        if cfg.dims == "mixed" and not self.stored_volume:
            raise ConfigError(
                "pipeline.dims=mixed trains on radiographs and CT volumes together, but these shards "
                "hold no CT volume: prepare the cohort with prepare.volume.enabled=true, or train with "
                "pipeline.dims=2"
            )
        three = cfg.dims in (3, "mixed")
        return {
            "channels": self.volume_channels if three else 1,
            "volume_size": list(cfg.volume_size) if three else None,
            "tubelet": list(cfg.tubelet) if three else None,
            "mixed": cfg.dims == "mixed",
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "vocab_size": self.vocab_size,
            "n_num": len(self.num_names),
            "cat_sizes": list(self.cat_sizes),
            "max_static_codes": cfg.max_static_codes,
            "max_events": cfg.max_events,
            "ehr_tokens": len(self.num_names) + len(self.cat_sizes) + cfg.max_static_codes + cfg.max_events,
            "num_target_blocks": cfg.mask.num_target_blocks,
        }


@dataclass(frozen=True)
class EhrLayout:
    """Where each kind of EHR token sits along the token axis: [numeric | categorical | codes | events]."""

    n_num: int
    n_cat: int
    n_static_codes: int
    n_events: int

    @classmethod
    def of(cls, spec: FeatureSpec, cfg: PipelineConfig) -> EhrLayout:
        return cls(len(spec.num_names), len(spec.cat_sizes), cfg.max_static_codes, cfg.max_events)

    @property
    def num(self) -> slice:
        return slice(0, self.n_num)

    @property
    def cat(self) -> slice:
        return slice(self.n_num, self.n_num + self.n_cat)

    @property
    def static_codes(self) -> slice:
        return slice(self.cat.stop, self.cat.stop + self.n_static_codes)

    @property
    def events(self) -> slice:
        return slice(self.static_codes.stop, self.static_codes.stop + self.n_events)

    @property
    def tokens(self) -> int:
        return self.events.stop


class OtherImageKind(Exception):
    """A sample whose only content is an image of the kind this run does not train on (a
    radiograph in a 3-D run, a CT volume in a 2-D run): left out, and not counted as bad."""


class BadSample(Exception):
    """A sample that cannot be used (missing or undecodable field); carries the reason."""


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's crops, jitter and masks: the same for the same seed/epoch/key."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, int.from_bytes(digest[:4]), int.from_bytes(digest[4:])])


def decode_sample(
    image: bytes | None,
    ehr: bytes | None,
    meta: bytes | None,
    stored_size: int,
    volume: tuple[int, ...] | None = None,
    mixed: bool = False,
):
    """(image or None, ehr dict or None, meta dict); BadSample when unusable. The image is
    (S0, S0) uint16 for a 2-D run (`volume` None), (C, Z0, Y0, X0) float16 for a 3-D run (`volume`
    = the stored (C, Z0, Y0, X0)); an image of the other kind is left out (the sample keeps its EHR).
    `mixed`: both kinds are taken, each checked against its own stored shape."""
    if meta is None:
        raise BadSample("no meta.json")
    try:
        m = json.loads(meta)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample(f"meta.json is not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise BadSample("meta.json is not an object")
    img = None
    is_volume = (m.get("image") or {}).get("kind") == "ct_volume"
    if m.get("has_image") and (mixed or is_volume == (volume is not None)):
        if image is None:
            raise BadSample("meta says has_image but image.npy is missing")
        try:
            arr = decode_npy(image)
        except Exception as e:
            raise BadSample(f"image.npy does not decode ({type(e).__name__})") from None
        shape, dtype = (
            (tuple(volume), np.float16) if is_volume else ((1, stored_size, stored_size), np.uint16)
        )
        if arr.shape != shape or arr.dtype != dtype:
            raise BadSample(
                f"image.npy has shape {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}"
            )
        img = arr if is_volume else arr[0]
    arrays = None
    if m.get("has_ehr"):
        if ehr is None:
            raise BadSample("meta says has_ehr but ehr.npz is missing")
        try:
            arrays = decode_npz(ehr)
        except Exception as e:
            raise BadSample(f"ehr.npz does not decode ({type(e).__name__})") from None
        need = {"event_code", "event_time", "event_value", "static_code", "static_num", "static_cat"}
        if not need <= arrays.keys():
            raise BadSample(f"ehr.npz lacks {sorted(need - arrays.keys())}")
    if img is None and arrays is None:
        if m.get("has_image"):
            raise OtherImageKind("CT volume" if is_volume else "2-D image")
        raise BadSample("the sample has neither an image nor EHR")
    return img, arrays, m


def _crop_boxes(rng: np.random.Generator, cfg: PipelineConfig, size: int, train: bool) -> tuple[float, ...]:
    """(y0, x0, h, w, flip) of the crop in stored pixels."""
    if not train:
        return 0.0, 0.0, float(size), float(size), 0.0
    area = rng.uniform(*cfg.crop_scale)
    aspect = math.exp(rng.uniform(*(math.log(a) for a in cfg.crop_aspect)))
    h = min(size * math.sqrt(area * aspect), size)
    w = min(size * math.sqrt(area / aspect), size)
    y0, x0 = rng.uniform(0, size - h), rng.uniform(0, size - w)
    flip = float(cfg.hflip and rng.random() < 0.5)
    return y0, x0, h, w, flip


def _images(
    raw: np.ndarray, boxes: np.ndarray, jitter: np.ndarray, valid: np.ndarray, cfg: PipelineConfig
) -> np.ndarray:
    """Crop + resize (+ flip), intensity jitter and normalisation of a batch, with torch.

    raw (B, S0, S0) uint16; boxes (B, 5) y0, x0, h, w, flip in stored pixels; jitter (B, 3) gamma,
    contrast, brightness; valid (B, 4) the image area in output pixels (outside it is padding,
    which stays at the value of 0). Each crop is resized on its own (antialiased bilinear: the
    crops differ in size); the intensity steps run on the whole batch, folded into one affine.
    """
    import torch
    import torch.nn.functional as F

    b, s = raw.shape[0], cfg.image_size
    x = torch.from_numpy(raw.astype(np.float32))  # (B, S0, S0), stored units 0..65535
    out = torch.empty(b, 1, s, s)
    for i in range(b):
        y0, x0, h, w, flip = (round(float(v)) for v in boxes[i])
        crop = x[i, y0 : y0 + max(h, 1), x0 : x0 + max(w, 1)][None, None]
        if crop.shape[-2:] != (s, s):
            crop = F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        out[i] = crop[0].flip(-1) if flip else crop[0]
    gamma, contrast, brightness = (torch.from_numpy(jitter[:, k].astype(np.float32)) for k in range(3))
    mean, std = cfg.normalize
    scale = torch.full((b,), 1 / 65535.0)
    if bool((gamma != 1).any()):
        out.pow_(gamma[:, None, None, None])
        scale = scale**gamma  # (v / 65535)^g = v^g x 65535^-g
    # clamp((v x scale - 0.5) x c + 0.5 + b, 0, 1), normalised: one multiply, one add, one clamp
    mul = scale * contrast / std
    add = (0.5 - 0.5 * contrast + brightness - mean) / std
    out.mul_(mul[:, None, None, None]).add_(add[:, None, None, None])
    lo, hi = (0 - mean) / std, (1 - mean) / std
    out.clamp_(lo, hi)
    for i in range(b):  # padding back to the value of black
        t, left, bottom, right = (round(float(v)) for v in valid[i])
        out[i, :, :t], out[i, :, bottom:] = lo, lo
        out[i, :, :, :left], out[i, :, :, right:] = lo, lo
    return out.numpy()


def _valid_out(box: list[int] | None, crop: tuple[float, ...], size: int, out: int) -> tuple[float, ...]:
    """The stored image's valid box (y0, x0, y1, x1) in output pixels after the crop (and flip)."""
    y0, x0, h, w, flip = crop
    vy0, vx0, vy1, vx1 = box if box else (0, 0, size, size)
    ty0, ty1 = (vy0 - y0) * out / h, (vy1 - y0) * out / h
    tx0, tx1 = (vx0 - x0) * out / w, (vx1 - x0) * out / w
    if flip:
        tx0, tx1 = out - tx1, out - tx0
    return max(ty0, 0.0), max(tx0, 0.0), min(ty1, out), min(tx1, out)


def _patch_region(valid: tuple[float, ...], patch: int, grid: int) -> tuple[tuple[int, int], ...]:
    """Patches at least half inside the valid box, per axis [lo, hi); never empty."""
    out = []
    for lo, hi in ((valid[0], valid[2]), (valid[1], valid[3])):
        a = min(max(math.floor(lo / patch + 0.5), 0), grid - 1)
        b = max(min(math.ceil(hi / patch - 0.5), grid), a + 1)
        out.append((a, b))
    return tuple(out)


def _ehr_arrays(arrays: dict[str, np.ndarray], spec: FeatureSpec, lay: EhrLayout, row: dict) -> None:
    """Fill one sample's EHR tokens in `row` (views into the batch arrays)."""
    num = arrays["static_num"].astype(np.float32)
    if num.size == lay.n_num:
        ok = ~np.isnan(num)
        row["ehr_value"][lay.num] = np.where(ok, (np.where(ok, num, 0) - spec.num_mean) / spec.num_std, 0)
        row["ehr_value_present"][lay.num] = ok
    row["ehr_valid"][lay.num] = True  # a missing value is a token too (value_present False)
    cat = arrays["static_cat"].astype(np.int64)
    if cat.size == lay.n_cat:
        row["ehr_code"][lay.cat] = np.clip(cat, 0, np.array(spec.cat_sizes) - 1)
    row["ehr_valid"][lay.cat] = True
    sc = np.clip(arrays["static_code"][: lay.n_static_codes].astype(np.int64), 0, spec.vocab_size - 1)
    start = lay.static_codes.start
    row["ehr_code"][start : start + sc.size] = sc
    row["ehr_valid"][start : start + sc.size] = True
    code = np.clip(arrays["event_code"][-lay.n_events :].astype(np.int64), 0, spec.vocab_size - 1)
    value = arrays["event_value"][-lay.n_events :].astype(np.float32)
    time = -arrays["event_time"][-lay.n_events :].astype(np.float32)  # days before the index
    present = ~np.isnan(value)
    norm = (np.where(present, value, 0) - spec.code_mean[code]) / spec.code_std[code]
    ev = slice(lay.events.start, lay.events.start + code.size)  # oldest first, padding after
    row["ehr_code"][ev] = code
    row["ehr_time"][ev] = np.maximum(time, 0)
    row["ehr_value"][ev] = np.where(present, np.clip(norm, -_VALUE_CLIP, _VALUE_CLIP), 0)
    row["ehr_value_present"][ev] = present
    row["ehr_valid"][ev] = True


def empty_batch(b: int, spec: FeatureSpec, cfg: PipelineConfig) -> dict[str, np.ndarray]:
    """Zero-filled output arrays for b samples."""
    s, L, m = cfg.image_size, EhrLayout.of(spec, cfg).tokens, cfg.mask.num_target_blocks
    n = max(math.prod(g) for g in cfg.grids)
    image_shape = (spec.volume_channels, *cfg.volume_size) if cfg.dims == 3 else (1, s, s)
    kinds = {}
    if cfg.dims == "mixed":
        kinds = {
            "volume": np.zeros((b, spec.volume_channels, *cfg.volume_size), np.float32),
            "is_volume": np.zeros(b, bool),
        }
    return {
        "key": np.empty(b, dtype=object),
        "meta": np.empty(b, dtype=object),
        "image": np.zeros((b, *image_shape), np.float32),
        **kinds,
        "has_image": np.zeros(b, bool),
        "has_ehr": np.zeros(b, bool),
        "ehr_code": np.zeros((b, L), np.int64),
        "ehr_time": np.zeros((b, L), np.float32),
        "ehr_value": np.zeros((b, L), np.float32),
        "ehr_value_present": np.zeros((b, L), bool),
        "ehr_valid": np.zeros((b, L), bool),
        "policy": np.zeros(b, np.int8),
        "img_ctx": np.zeros((b, n), bool),
        "img_tgt": np.zeros((b, m, n), bool),
        "ehr_ctx": np.zeros((b, L), bool),
        "ehr_tgt": np.zeros((b, L), bool),
    }


def transform_batch(
    batch: dict[str, Any],
    spec: FeatureSpec,
    cfg: PipelineConfig,
    *,
    train: bool,
    epoch: int,
    on_bad=None,
) -> dict[str, np.ndarray]:
    """Decode, augment and mask a batch of raw samples (see the module docstring for the layout).

    A sample that cannot be used is left out and reported as `on_bad(shard, key, reason)`.
    """
    keys = [str(k) for k in batch["key"]]
    mixed = cfg.dims == "mixed"
    volume = (spec.volume_channels, *spec.stored_volume) if cfg.dims != 2 and spec.stored_volume else None
    if cfg.dims != 2 and volume is None:
        raise ShardError(
            f"pipeline.dims={cfg.dims}, but the shards hold no CT volumes (prepare.volume.enabled)"
        )
    decoded, kept = [], []
    for i, key in enumerate(keys):
        try:
            decoded.append(
                decode_sample(
                    batch["image"][i], batch["ehr"][i], batch["meta"][i], spec.stored_size, volume, mixed
                )
            )
            kept.append(i)
        except OtherImageKind:
            continue
        except BadSample as e:
            if on_bad is None:
                raise ShardError(f"shard {batch['shard'][i]}, sample {key}: {e}") from None
            on_bad(str(batch["shard"][i]), key, str(e))
    out = empty_batch(len(kept), spec, cfg)
    layout = EhrLayout.of(spec, cfg)
    s0, s, p = spec.stored_size, cfg.image_size, cfg.patch_size
    g = s // p
    grid_2d, grid_3d = (g, g), cfg.grids[-1]
    boxes = np.zeros((len(kept), 5))
    jitter = np.tile([1.0, 1.0, 0.0], (len(kept), 1))
    valid = np.zeros((len(kept), 4))
    with_image, with_volume = [], []
    for j, (i, (img, arrays, meta)) in enumerate(zip(kept, decoded, strict=True)):
        three = img is not None and img.ndim == 4  # a CT volume (C, Z, Y, X)
        grid = grid_3d if three or cfg.dims == 3 else grid_2d
        key = keys[i]
        out["key"][j] = key
        out["meta"][j] = (
            batch["meta"][i].decode() if isinstance(batch["meta"][i], bytes) else batch["meta"][i]
        )
        rng = sample_rng(cfg.seed, epoch, key)
        row = {name: out[name][j] for name in out if name.startswith("ehr_")}
        region = None
        if three:
            out["has_image"][j] = True
            with_volume.append(j)
            if mixed:
                out["is_volume"][j] = True
            boxes[j] = _crop_boxes(rng, cfg, volume[2], train)  # in-plane (Y0 = X0); every slice
        elif img is not None:
            out["has_image"][j] = True
            with_image.append(j)
            crop = _crop_boxes(rng, cfg, s0, train)
            boxes[j] = crop
            if train:
                gamma = math.exp(rng.uniform(-1, 1) * math.log1p(cfg.gamma))
                jitter[j] = (
                    gamma,
                    rng.uniform(1 - cfg.contrast, 1 + cfg.contrast),
                    rng.uniform(-cfg.brightness, cfg.brightness),
                )
            valid[j] = _valid_out((meta.get("image") or {}).get("valid_box"), crop, s0, s)
            region = _patch_region(valid[j], p, g)
        if arrays is not None:
            out["has_ehr"][j] = True
            _ehr_arrays(arrays, spec, layout, row)
        masks = sample_masks(rng, grid, out["ehr_valid"][j], img is not None, cfg.mask, region)
        out["policy"][j] = masks.policy
        k = masks.img_ctx.size  # the sample's own grid: a mixed batch's smaller kind leaves the rest empty
        out["img_ctx"][j, :k], out["img_tgt"][j, :, :k] = masks.img_ctx, masks.img_tgt
        out["ehr_ctx"][j], out["ehr_tgt"][j] = masks.ehr_ctx, masks.ehr_tgt
    for rows, resize, name in ((with_image, _images, "image"), (with_volume, _volumes, "volume")):
        if rows:
            idx = np.array(rows)
            raw = np.stack([decoded[j][0] for j in rows])
            out[name if mixed else "image"][idx] = resize(raw, boxes[idx], jitter[idx], valid[idx], cfg)
    return out


def _volumes(
    raw: np.ndarray, boxes: np.ndarray, jitter: np.ndarray, valid: np.ndarray, cfg: PipelineConfig
) -> np.ndarray:
    """Crop (in plane, every slice kept) + trilinear resize to volume_size, normalisation, of a
    batch of CT volumes: raw (B, C, Z0, Y0, X0) float16 windows in [0, 1]; boxes (B, 5) as for 2-D
    images. The windows carry the intensity (HU), so there is no intensity jitter here."""
    import torch
    import torch.nn.functional as F

    mean, std = cfg.normalize
    out = torch.empty(raw.shape[0], raw.shape[1], *cfg.volume_size)
    for i in range(raw.shape[0]):
        y0, x0, h, w, flip = (round(float(v)) for v in boxes[i])
        crop = torch.from_numpy(raw[i, :, :, y0 : y0 + max(h, 1), x0 : x0 + max(w, 1)].astype(np.float32))
        crop = F.interpolate(crop[None], size=tuple(cfg.volume_size), mode="trilinear", align_corners=False)[
            0
        ]
        out[i] = crop.flip(-1) if flip else crop
    return ((out - mean) / std).numpy()
