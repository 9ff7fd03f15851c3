"""`jepa-ray search`: the nearest cases of an index to a sample of the archive or to a DICOM file.

A query DICOM goes through `prepare`'s decoding (the index keeps the shards' manifest: image size,
windowing, limits) and the evaluation transform, then through the encoder the archive was embedded
with (kept in the index). Nothing of its header beyond `prepare`'s allowlist is read into the
result: the result holds the neighbours' safe metadata and, of the query, its allowlisted modality
and view, and its site's pseudonym when the de-identification salt is at hand (an index centred
per site compares the query after its site's mean is taken off; without the salt, or for a site
the archive lacks, after the archive's overall mean).

Filters (`--where`): `column = value`, `!=`, `in (a, b)`, joined by `and`, over the index's
columns (split, site, modality, view, subject, has_image, has_ehr, label_<name>); values are
compared as text, so `label_lung = 1` and `site = site-3f2a` both work.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jepa_ray.config import Config, StorageConfig
from jepa_ray.errors import ConfigError, JepaRayError
from jepa_ray.search.index import (
    CENTRES,
    DATA_MANIFEST,
    ENCODER,
    FAISS_FILE,
    INDEX_FILE,
    comparable,
    faiss,
    load_faiss,
    part_vectors,
    read_part,
    recorded_centres,
    vectors_from,
)
from jepa_ray.storage import Store

log = logging.getLogger("jepa_ray.search")

_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=|!=|\bin\b)\s*(.+?)\s*$", re.IGNORECASE)


@dataclass
class Index:
    """An index opened for search: its record, FAISS index and per-vector metadata (by id)."""

    url: str
    store: Store
    state: dict[str, Any]
    faiss_index: Any
    meta: pd.DataFrame  # one row per vector, indexed by id
    centres: dict[str, np.ndarray] | None = None  # index.centre=site: each site's mean vector


def open_index(url: str, storage: StorageConfig | None = None, nprobe: int | None = None) -> Index:
    """An index for search; an IVF index searches `nprobe` lists per query (None: the number
    `index` chose for the archive's recall target)."""
    store = Store(url, storage or StorageConfig())
    if not store.exists(INDEX_FILE):
        raise ConfigError(f"{url}: not a jepa-ray index (no {INDEX_FILE}); build one with `jepa-ray index`")
    state = json.loads(store.read_bytes(INDEX_FILE))
    index = load_faiss(store, state)
    if index is None:
        raise ConfigError(
            f"{store.uri(FAISS_FILE)}: not the index file {INDEX_FILE} records; rerun `jepa-ray index` to repair it"
        )
    if hasattr(index, "nprobe"):
        index.nprobe = min(nprobe or state.get("nprobe") or 32, index.nlist)
    frames = [read_part(store, name).drop(["vector"]).to_pandas() for name in state["shards"]]
    meta = pd.concat(frames, ignore_index=True).set_index("id") if frames else pd.DataFrame()
    centres = None
    if state.get("centre") == "site":
        centres = recorded_centres(store, state)
        if centres is None:
            raise ConfigError(
                f"{store.uri(CENTRES)}: not the site centres {INDEX_FILE} records; rerun `jepa-ray index` to refit them"
            )
    return Index(url, store, state, index, meta, centres)


def parse_where(where: str | None, columns: list[str]) -> list[tuple[str, str, list[str]]]:
    """'site = a and label_x in (0, 1)' -> [(column, op, values)]; ConfigError naming a bad clause."""
    if not where or not where.strip():
        return []
    out = []
    for clause in re.split(r"\s+and\s+", where.strip(), flags=re.IGNORECASE):
        m = _CLAUSE.match(clause)
        if not m:
            raise ConfigError(
                f"--where {where!r}: cannot read {clause!r} (use column = value, !=, in (a, b))"
            )
        col, op, value = m.group(1), m.group(2).lower(), m.group(3)
        if col not in columns:
            raise ConfigError(
                f"--where: no column {col!r} in this index (it has {', '.join(sorted(columns))})"
            )
        if op == "in":
            if not (value.startswith("(") and value.endswith(")")):
                raise ConfigError(f"--where {clause!r}: `in` takes a list in parentheses, e.g. in (a, b)")
            values = [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
        else:
            values = [value.strip("'\"")]
        out.append((col, op, values))
    return out


def _text(series: pd.Series) -> pd.Series:
    """Values as the filter compares them: integers without '.0', booleans as true/false too."""

    def one(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        if isinstance(v, bool | np.bool_):
            return "true" if v else "false"
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return series.map(one)


def allowed_ids(index: Index, where: str | None) -> np.ndarray | None:
    """The ids the filter keeps (None: no filter)."""
    clauses = parse_where(where, list(index.meta.columns))
    if not clauses:
        return None
    keep = np.ones(len(index.meta), bool)
    for col, op, values in clauses:
        text = _text(index.meta[col]).str.lower()
        hit = text.isin([v.lower() for v in values]).to_numpy()
        keep &= ~hit if op == "!=" else hit
    return index.meta.index.to_numpy()[keep]


def search_vectors(
    index: Index,
    queries: np.ndarray,
    k: int,
    where: str | None = None,
    exclude: list[str] | None = None,
    sites: list[str | None] | None = None,
) -> list[list[dict[str, Any]]]:
    """The k nearest vectors to each query (cosine distance), with their metadata; `exclude`: a key
    per query never returned for it (the query itself); `sites`: each query's site pseudonym, for
    an index centred per site (None or a site the archive lacks: the archive's overall centre)."""
    f = faiss()
    ids = allowed_ids(index, where)
    extra = 1 if exclude else 0
    params = None
    if ids is not None:
        if len(ids) == 0:
            return [[] for _ in range(len(queries))]
        selector = f.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        if hasattr(index.faiss_index, "nprobe"):
            params = f.SearchParametersIVF(sel=selector, nprobe=index.faiss_index.nprobe)
        else:
            params = f.SearchParameters(sel=selector)
    q = np.atleast_2d(queries)
    q = comparable(q, sites or [None] * len(q), index.centres)
    want = min(k + extra, index.faiss_index.ntotal)
    sims, found = index.faiss_index.search(q, want, params=params)
    results = []
    for qi in range(len(q)):
        rows = []
        for sim, i in zip(sims[qi], found[qi], strict=True):
            if i < 0:
                continue
            m = index.meta.loc[int(i)]
            if exclude and m["key"] == exclude[qi]:
                continue
            row = {"key": m["key"], "distance": float(1.0 - sim)}
            row.update({c: _plain(v) for c, v in m.items() if c != "key"})
            rows.append(row)
        results.append(rows[:k])
    return results


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


def _id_of_key(index: Index, key: str) -> int:
    hit = index.meta.index[index.meta["key"] == key]
    if len(hit) == 0:
        raise ConfigError(f"--key {key}: no such sample in the index {index.url}")
    return int(hit[0])


def site_of_key(index: Index, key: str) -> str | None:
    return _plain(index.meta.loc[_id_of_key(index, key), "site"])


def vector_of_key(index: Index, key: str) -> np.ndarray:
    vid = _id_of_key(index, key)
    table = read_part(index.store, index.meta.loc[vid, "shard"], ["id", "vector"])
    row = int(np.flatnonzero(table["id"].to_numpy() == vid)[0])
    return part_vectors(table)[row]


def vector_of_dicom(index: Index, path: str, cfg: Config) -> tuple[np.ndarray, dict[str, Any]]:
    """The query DICOM's vector, as the archive's samples were embedded; and its safe fields
    (modality, view; site: its pseudonym, None without the salt)."""
    import tempfile

    import torch

    from jepa_ray.config import PrepareConfig
    from jepa_ray.eval.embed import EncoderSource, embed_batch, eval_pipeline
    from jepa_ray.ingest.write import decode_images
    from jepa_ray.search.index import COLUMNS
    from jepa_ray.stream.local import raw_batch
    from jepa_ray.stream.pipeline import collate
    from jepa_ray.stream.transform import FeatureSpec, transform_batch

    modality = index.state["modality"]
    if modality == "ehr":
        raise ConfigError(f"--dicom: the index {index.url} holds EHR embeddings; an image cannot query it")
    if not Path(path).is_file():
        raise ConfigError(f"--dicom {path}: no such file")
    manifest = json.loads(index.store.read_bytes(DATA_MANIFEST))
    prep = PrepareConfig.model_validate(
        {k: manifest["config"][k] for k in ("image", "volume", "limits") if k in manifest["config"]}
    )
    [dec] = decode_images([[(str(path), Path(path).name)]], prep.image, prep.volume, ["image"], prep.limits)
    if dec["image"] is None:
        why = "; ".join(
            f"{q.get('reason')}" + (f" ({q['detail']})" if q.get("detail") else "") for q in dec["quarantine"]
        )
        raise JepaRayError(f"--dicom {path}: cannot be used as a query: {why or 'no image'}")
    meta = {"has_image": True, "has_ehr": False, **dec["meta"]}
    raw = raw_batch({"query": {"image": dec["image"], "meta": json.dumps(meta).encode()}}, shard="query")
    spec = FeatureSpec.from_manifest(manifest)
    with tempfile.TemporaryDirectory(prefix="jepa-search-") as tmp:
        weights = Path(tmp) / ENCODER
        weights.write_bytes(index.store.read_bytes(ENCODER))
        weights.with_suffix(".json").write_bytes(
            index.store.read_bytes(ENCODER.replace(".safetensors", ".json"))
        )
        info = json.loads(weights.with_suffix(".json").read_text())
        model = EncoderSource("index", str(weights), info).build()
    pcfg = eval_pipeline(cfg, info)
    batch = collate(transform_batch(raw, spec, pcfg, train=False, epoch=0))
    with torch.no_grad():
        out = embed_batch(model, batch, cfg.eval.regions, "target")  # as the index was built
    dicom = dec["meta"].get("dicom") or {}
    columns = {
        k: v.float().numpy() for k, v in out.items() if k in ("emb_image", "img_tokens", COLUMNS[modality])
    }
    vector = vectors_from(columns, modality, index.state.get("embedding", "pooled"))[0]
    return vector, {
        "modality": dicom.get("modality"),
        "view": dicom.get("view"),
        "site": _site(path, cfg, prep),
    }


def _site(path: str, cfg: Config, prep) -> str | None:
    """The query's site pseudonym, as `prepare` would write it; None without the salt."""
    from jepa_ray.ingest.deid import Pseudonymizer
    from jepa_ray.ingest.header import read_header

    try:
        salt = cfg.prepare.deid.resolve_salt()
    except ConfigError:
        log.info("no de-identification salt: the query's site is unknown (centred on the archive's mean)")
        return None
    return Pseudonymizer(salt).site(read_header(path, prep.limits).institution)
