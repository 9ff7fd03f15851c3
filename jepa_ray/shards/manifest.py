"""`manifest.json`: the contract between `prepare` and everything that reads shards.

It holds per-shard counts and sha256, the EHR vocabulary and statistics (training split only),
the (salt-free) config, and the quarantine: every rejected input with its reason.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import jepa_ray
from jepa_ray.config import PrepareConfig
from jepa_ray.errors import ShardError
from jepa_ray.shards.format import SCHEMA_VERSION
from jepa_ray.storage import Store

MANIFEST = "manifest.json"


def build_manifest(
    *,
    shards: list[dict[str, Any]],
    vocab: Any,
    cfg: PrepareConfig,
    salt_fingerprint: str,
    quarantine: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    inputs: dict[str, Any],
    extra: dict[str, int],
) -> dict[str, Any]:
    """Assemble the manifest from the shard records and what the run saw."""
    splits: dict[str, dict[str, Any]] = {}
    for r in shards:
        s = splits.setdefault(r["split"], {"shards": [], "samples": 0, "image": 0, "ehr": 0, "paired": 0})
        s["shards"].append(r["name"])
        for k in ("samples", "image", "ehr", "paired"):
            s[k] += r[k]
        if r.get("masks"):  # samples with ground-truth masks (evaluation only)
            s["masks"] = s.get("masks", 0) + r["masks"]
    for s in splits.values():
        s["image_only"] = s["image"] - s["paired"]
        s["ehr_only"] = s["ehr"] - s["paired"]
    sites: Counter[str] = Counter()
    for r in shards:
        sites.update(r["sites"])
    reasons: Counter[str] = Counter()
    for q in quarantine:
        reasons[q["reason"]] += q.get("count", 1)
    dicom_bad = sum(q.get("count", 1) for q in quarantine if q["kind"] == "dicom")
    ehr_rows = inputs.get("ehr", {}).get("event_rows", 0)
    ehr_bad = sum(q.get("count", 1) for q in quarantine if q["kind"] == "ehr_rows")
    fractions = {}
    if inputs.get("dicom_files"):
        fractions["dicom"] = dicom_bad / inputs["dicom_files"]
    if ehr_rows:
        fractions["ehr_rows"] = ehr_bad / ehr_rows
    config = cfg.model_dump(mode="json")  # the caller has replaced external site names by pseudonyms
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"jepa-ray {jepa_ray.__version__}",
        "salt_fingerprint": salt_fingerprint,
        "image": {
            "size": cfg.image.size,
            "dtype": "uint16",
            "layout": "CHW",
            "channels": 1,
            "value_range": [0, 1],
        },
        "volume": (
            {
                "size": list(cfg.volume.size),
                "spacing_mm": list(cfg.volume.spacing),
                "channels": list(cfg.volume.windows),
                "dtype": "float16",
                "layout": "CZYX",
                "value_range": [0, 1],
            }
            if cfg.volume.enabled
            else None
        ),
        "counts": {
            "samples": sum(r["samples"] for r in shards),
            "image": sum(r["image"] for r in shards),
            "ehr": sum(r["ehr"] for r in shards),
            "paired": sum(r["paired"] for r in shards),
            "volume": sum(r.get("volume", 0) for r in shards),
            **extra,
        },
        "splits": splits,
        "sites": dict(sorted(sites.items())),
        "shards": [
            {k: r[k] for k in ("name", "split", "samples", "image", "ehr", "paired", "bytes", "sha256")}
            for r in shards
        ],
        "ehr": {**vocab.to_json(), "max_events": cfg.ehr.max_events, **inputs.get("ehr", {})},
        "config": config,
        "inputs": {k: v for k, v in inputs.items() if k != "ehr"},
        "quarantine": {
            "count": sum(q.get("count", 1) for q in quarantine),
            "by_reason": dict(sorted(reasons.items())),
            "fractions": fractions,
            "items": quarantine,
        },
        "skipped": skipped,
    }


def read_manifest(store: Store, missing_ok: bool = False) -> dict[str, Any] | None:
    """The manifest of a shard set; `ShardError` if missing (unless `missing_ok`) or unreadable."""
    if not store.exists(MANIFEST):
        if missing_ok:
            return None
        raise ShardError(
            f"{store.uri(MANIFEST)}: no manifest; run `jepa-ray prepare` first (or it was interrupted)"
        )
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except json.JSONDecodeError as e:
        raise ShardError(f"{store.uri(MANIFEST)}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{store.uri(MANIFEST)}: schema version {manifest.get('schema_version')} but this jepa-ray reads "
            f"{SCHEMA_VERSION}; rerun prepare"
        )
    return manifest


def verify_shards(store: Store, manifest: dict[str, Any]) -> list[str]:
    """Recompute every shard's sha256; the list of problems (empty when all shards match)."""
    problems = []
    for shard in manifest["shards"]:
        name = shard["name"]
        if not store.exists(name):
            problems.append(f"{name}: missing")
            continue
        digest = store.sha256(name)
        if digest != shard["sha256"]:
            problems.append(f"{name}: sha256 mismatch (expected {shard['sha256'][:12]}…, got {digest[:12]}…)")
    return problems
