"""`jepa-ray index`: an archive's embeddings in a FAISS index, kept on local disk or S3.

    shards (manifest) -> the shards not yet indexed, or changed since (sha256)
      -> build_dataset(train=False, keep_shard) -> map_batches(Embedder)   # evaluation's actor pool
      -> INDEX/parts/<shard>.parquet   id, key, vector (L2-normalised), safe metadata
      -> INDEX/centres.npz            index.centre=site: each site's mean vector
      -> INDEX/vectors.faiss          ids -> comparable vectors (site-centred, normalised): flat or IVF
      -> INDEX/index.json             written last: encoder, modality, shards indexed, counts
      -> INDEX/encoder.safetensors    the encoder, so that a query embeds as the archive did
      -> INDEX/data-manifest.json     the shards' manifest: how a query DICOM is decoded

FAISS, not a vector database: the index is one file beside plain parquet, read by any process that
has the file (a laptop, a Ray job, a notebook), with exact search (every vector compared, the
reference) and IVF (inverted lists over k-means centroids) in one maintained library; IVF rather
than HNSW because it removes vectors (a shard re-prepared, a subject withdrawn) and adds them
without a rebuild. Vectors are L2-normalised and compared by inner product: the distance reported
is the cosine distance, 1 - cos, between the comparable vectors.

What stands for an image (`index.vectors`): `pooled`, the mean of its patch tokens, or `regions`,
its grid of region tokens (eval.regions² pooled patch tokens, each layer-normed, concatenated),
which keeps where things are. With `index.centre=site` (the default) a vector is compared after
its site's mean is taken off: on a multi-site archive the site's detector and protocol otherwise
decide the nearest cases (measured: benchmarks/bench_search.py quality). A site's mean is fixed
when the site is first indexed (later additions keep it, so the FAISS index stays incremental);
`--rebuild` refits every mean. A query from a site the archive lacks is centred on the mean of
every indexed vector.

A rerun embeds only shards it has not indexed (or whose bytes changed) and drops the rows of shards
the data no longer has. `index.json` records the sha256 of `vectors.faiss`: an index file from an
interrupted run that does not match it is rebuilt from the parts, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jepa_ray.config import Config
from jepa_ray.errors import ConfigError
from jepa_ray.storage import Store

log = logging.getLogger("jepa_ray.search")

FORMAT = 1
INDEX_FILE = "index.json"
FAISS_FILE = "vectors.faiss"
PARTS = "parts"
ENCODER = "encoder.safetensors"
DATA_MANIFEST = "data-manifest.json"
CENTRES = "centres.npz"
ALL_SITES = "*"  # the centre of a site the archive lacks: the mean of every indexed vector
COLUMNS = {"image": "emb_image", "ehr": "emb_ehr", "joint": "emb_joint"}
META = ("key", "subject", "split", "site", "modality", "view", "has_image", "has_ehr", "shard")
TRAIN_MIN = 39  # FAISS wants at least 39 training points per IVF list
RECALL_QUERIES = 256  # archive vectors queried to choose an IVF index's nprobe


@dataclass
class IndexResult:
    """What `build_index` did."""

    url: str
    kind: str  # "exact" or "ivf"
    vectors: int
    added: int
    removed: int
    shards_embedded: list[str] = field(default_factory=list)
    seconds: float = 0.0


def faiss():
    try:
        import faiss as f
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ConfigError("jepa-ray index needs faiss-cpu (pip install faiss-cpu)") from e
    return f


def part_name(shard: str) -> str:
    return f"{PARTS}/{shard.removesuffix('.tar')}.parquet"


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def vectors_from(columns: dict[str, Any], modality: str, vectors: str) -> np.ndarray:
    """The vectors that stand for a batch's samples (rows), from the Embedder's columns: the
    modality's pooled embedding, or (`regions`) the region tokens each layer-normed, concatenated."""
    if vectors == "pooled":
        return np.asarray(columns[COLUMNS[modality]], np.float32)
    width = np.asarray(columns["emb_image"]).shape[1]
    t = np.asarray(columns["img_tokens"], np.float32)
    t = t.reshape(len(t), -1, width)
    t = (t - t.mean(-1, keepdims=True)) / (t.std(-1, keepdims=True) + 1e-6)
    return t.reshape(len(t), -1)


def comparable(vec: np.ndarray, sites, centres: dict[str, np.ndarray] | None) -> np.ndarray:
    """What FAISS compares: each normalised vector minus its site's centre (a site without one:
    the archive's overall centre), normalised again; a zero vector (the sample lacks the
    modality) stays zero. `centres` None: the vectors as they are."""
    vec = normalise(vec)
    if not centres:
        return vec
    shift = np.stack([centres.get(str(s), centres[ALL_SITES]) for s in sites]) if len(vec) else vec
    present = np.linalg.norm(vec, axis=1, keepdims=True) > 0
    return normalise(np.where(present, vec - shift, 0.0))


def read_centres(store: Store) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store.read_bytes(CENTRES)), allow_pickle=False) as z:
        return dict(zip((str(n) for n in z["sites"]), z["centres"], strict=True))


def _fit_centres(store: Store, shards: dict[str, dict], have: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`have` plus the mean vector of every site that has none yet, over the parts (vectors of
    samples that lack the modality, all zero, left out); the overall mean once, at the first fit."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name, v in sorted(shards.items()):
        if not v["vectors"]:
            continue
        t = read_part(store, name, ["site", "vector"])
        vec, sites = part_vectors(t), np.array([str(x) for x in t["site"].to_pylist()])
        present = np.linalg.norm(vec, axis=1) > 0
        for site in set(sites[present]) | ({ALL_SITES} - have.keys()):
            if site in have:
                continue
            rows = present if site == ALL_SITES else present & (sites == site)
            sums[site] = sums.get(site, 0) + vec[rows].sum(0)
            counts[site] = counts.get(site, 0) + int(rows.sum())
    out = dict(have)
    out.update({site: (sums[site] / max(counts[site], 1)).astype(np.float32) for site in sums})
    return out


def recorded_centres(store: Store, state: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
    """The site centres index.json records; None when there is no index yet, or the file is missing
    or is not the one recorded."""
    if state is None or not store.exists(CENTRES):
        return None
    if hashlib.sha256(store.read_bytes(CENTRES)).hexdigest() != state.get("centres_sha256"):
        return None
    return read_centres(store)


def _write_centres(store: Store, centres: dict[str, np.ndarray]) -> str:
    names = sorted(centres)
    sink = io.BytesIO()
    np.savez(sink, sites=np.array(names), centres=np.stack([centres[n] for n in names]))
    blob = sink.getvalue()
    store.write_bytes(CENTRES, blob)
    return hashlib.sha256(blob).hexdigest()


def safe_meta(meta_json: str, shard: str) -> dict[str, Any]:
    """The columns kept per sample: pseudonyms, split, site, modality, view, labels (`label_<name>`)."""
    m = json.loads(meta_json)
    dicom = m.get("dicom") or {}
    row = {
        "subject": m.get("subject"),
        "split": m.get("split"),
        "site": m.get("site"),
        "modality": dicom.get("modality"),
        "view": dicom.get("view"),
        "has_image": bool(m.get("has_image", False)),
        "has_ehr": bool(m.get("has_ehr", False)),
        "shard": shard,
    }
    for name, value in (m.get("labels") or {}).items():
        row[f"label_{name}"] = None if value is None else int(value)
    return row


def _encoder_key(info: dict[str, Any], weights: bytes) -> str:
    return hashlib.sha256(weights + json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def build_index(
    encoder: str, data: str, out: str, cfg: Config, *, rebuild: bool = False, verbose: bool = False
) -> IndexResult:
    """Index the shards at `data` with `encoder` (an export, run or checkpoint) into `out`; a rerun
    adds what is new. Ray must be connected (the embedding is Ray Data batch inference)."""
    import tempfile

    from jepa_ray.eval.evaluate import resolve_encoder
    from jepa_ray.shards.manifest import read_manifest

    t0 = time.perf_counter()
    ic, storage = cfg.index, cfg.train.storage
    store = Store(out, storage)
    store.makedirs()
    with tempfile.TemporaryDirectory(prefix="jepa-index-") as tmp:
        source = resolve_encoder(encoder, cfg, Path(tmp))
        weights = Path(source.weights).read_bytes()
        info_json = Path(source.weights).with_suffix(".json").read_bytes()
    enc_key = _encoder_key(source.info, weights)
    if rebuild:  # an interrupted rebuild must not leave the old index.json over new parts
        store.remove(INDEX_FILE)
    state = _read_state(store)
    if state is not None:
        _check_same(state, out, enc_key, ic, data)
    if ic.vectors == "regions" and ic.modality != "image":
        raise ConfigError(
            f"index.vectors=regions is an image's region tokens; index.modality is {ic.modality}"
        )
    manifest = read_manifest(Store(data, storage))
    splits = ic.splits or sorted(manifest.get("splits", {}))
    unknown = [s for s in splits if s not in manifest.get("splits", {})]
    if unknown:
        raise ConfigError(
            f"index.splits: {unknown[0]!r} is not a split of {data} (it has "
            f"{', '.join(sorted(manifest.get('splits', {})))})"
        )
    wanted = {s["name"]: s for s in manifest["shards"] if s["split"] in splits}
    indexed = {} if state is None else state["shards"]
    todo = sorted(n for n, s in wanted.items() if indexed.get(n, {}).get("sha256") != s["sha256"])
    gone = sorted(n for n in indexed if n not in wanted or n in todo)
    if state is None:
        store.write_bytes(ENCODER, weights)
        store.write_bytes(ENCODER.replace(".safetensors", ".json"), info_json)
    log.info(
        "index %s: %d shards indexed, %d to embed, %d to drop",
        out,
        len(indexed) - len(gone),
        len(todo),
        len(gone),
    )

    next_id = 0 if state is None else state["next_id"]
    removed_ids = np.concatenate(
        [
            pq.read_table(io.BytesIO(store.read_bytes(part_name(n))), columns=["id"])["id"].to_numpy()
            for n in gone
        ]
        or [np.zeros(0, np.int64)]
    )
    new_parts: dict[str, int] = {}
    for group in _groups(todo, wanted, ic.group_samples):
        counts, next_id = _embed_shards(source, data, manifest, group, cfg, store, next_id, verbose)
        new_parts.update(counts)
    shards = {n: v for n, v in indexed.items() if n not in gone}
    for name, rows in new_parts.items():
        shards[name] = {"sha256": wanted[name]["sha256"], "vectors": rows}
    kept = {part_name(n) for n in shards}
    for name in store.list(PARTS):  # dropped shards, and leftovers of an interrupted first build
        if name not in kept:
            store.remove(name)
    total = sum(v["vectors"] for v in shards.values())
    if total == 0:
        raise ConfigError(f"{data}: no sample to index in split(s) {', '.join(splits)}")

    centres, centres_sha, refit = None, None, False
    if ic.centre == "site":  # the sites already centred keep their means: their vectors stay valid
        have = recorded_centres(store, state) or {}
        refit = state is not None and not have  # centres lost or changed: every vector is re-added
        if refit:
            log.warning("%s: not the site centres index.json records: refitting them", store.uri(CENTRES))
        # a site not centred yet can only be in the parts just written
        centres = _fit_centres(store, {n: shards[n] for n in new_parts} if have else shards, have)
        centres_sha = (
            _write_centres(store, centres) if centres.keys() != have.keys() else state["centres_sha256"]
        )
    kind = "exact" if total <= ic.exact_max else "ivf"
    index = None
    if state is not None and state.get("kind") == kind and not rebuild and not refit:
        index = load_faiss(store, state)
        if index is None:
            log.warning("%s: not the index file index.json records (an interrupted run?): rebuilding it", out)
    if index is None:  # first build, a change of kind, or an index file that is not the recorded one
        index = _new_index(kind, store, shards, ic.nlist, centres)
        _add_parts(index, store, shards, centres)
    else:
        if len(removed_ids):
            index.remove_ids(np.ascontiguousarray(removed_ids, dtype=np.int64))
        _add_parts(index, store, {n: shards[n] for n in new_parts}, centres)
    if index.ntotal != total:  # parts rewritten by an interrupted run under the old record: rebuild
        log.warning(
            "%s: the index file holds %d vectors, the parts %d: rebuilding it", out, index.ntotal, total
        )
        index = _new_index(kind, store, shards, ic.nlist, centres)
        _add_parts(index, store, shards, centres)
    nprobe, recall = None, None
    if kind == "ivf":  # the lists an archive's own queries need for recall@10 >= index.recall_target
        queries = _training_sample(store, shards, RECALL_QUERIES, centres)
        nprobe, recall = tune_nprobe(
            index, _part_chunks(store, shards, centres), queries, ic.nprobe or 8, ic.recall_target
        )
        log.info("IVF: nprobe %d gives recall@10 %.3f against exact search", nprobe, recall)
        if recall < ic.recall_target:
            log.warning(
                "IVF recall@10 is %.3f even searching every list: set index.exact_max above %d for exact search",
                recall,
                total,
            )
    blob = faiss().serialize_index(index).tobytes()
    store.write_bytes(FAISS_FILE, blob)
    state = {
        "format": FORMAT,
        "encoder": enc_key,
        "encoder_info": source.info,
        "modality": ic.modality,
        "embedding": ic.vectors,  # index.vectors: pooled or regions
        "centre": ic.centre,
        "centres_sha256": centres_sha,
        "data": data,
        "splits": splits,
        "kind": kind,
        "nlist": getattr(index, "nlist", None),
        "nprobe": nprobe,  # IVF: lists searched per query, and the recall@10 it gave on this archive
        "recall_at_10": recall,
        "dim": index.d,
        "vectors": total,
        "next_id": next_id,
        "faiss_sha256": hashlib.sha256(blob).hexdigest(),
        "shards": dict(sorted(shards.items())),
    }
    # what a query is decoded and transformed with: the shards' image settings and features
    store.write_bytes(DATA_MANIFEST, json.dumps(manifest).encode())
    store.write_bytes(INDEX_FILE, json.dumps(state, indent=1).encode())
    added = sum(new_parts.values())
    return IndexResult(
        url=out,
        kind=kind,
        vectors=total,
        added=added,
        removed=len(removed_ids),
        shards_embedded=sorted(new_parts),
        seconds=time.perf_counter() - t0,
    )


def _read_state(store: Store) -> dict[str, Any] | None:
    if not store.exists(INDEX_FILE):
        return None
    try:
        state = json.loads(store.read_bytes(INDEX_FILE))
    except ValueError as e:
        raise ConfigError(f"{store.uri(INDEX_FILE)}: unreadable ({e}); rebuild it with --rebuild") from None
    if state.get("format") != FORMAT:
        raise ConfigError(
            f"{store.uri(INDEX_FILE)}: index format {state.get('format')}, this jepa-ray reads {FORMAT}"
        )
    return state


def _check_same(state: dict[str, Any], out: str, enc_key: str, ic, data: str) -> None:
    """A rerun adds to the index only what the same encoder embeds the same way."""
    modality = ic.modality
    for key, setting, default in (("embedding", "vectors", "pooled"), ("centre", "centre", "none")):
        if state.get(key, default) != getattr(ic, setting):
            raise ConfigError(
                f"{out}: built with index.{setting}={state.get(key, default)}, not {getattr(ic, setting)}; "
                "use --rebuild or another --out"
            )
    if state["encoder"] != enc_key:
        raise ConfigError(
            f"{out}: indexed with another encoder; its vectors would not compare with this one's. "
            "Use --rebuild to replace them, or another --out"
        )
    if state["modality"] != modality:
        raise ConfigError(
            f"{out}: holds {state['modality']} embeddings, not index.modality={modality}; "
            "use --rebuild or another --out"
        )
    if state["data"] != data:
        log.warning("%s: was built from %s; adding the shards of %s", out, state["data"], data)


def _groups(todo: list[str], shards: dict[str, dict], most: int) -> list[list[str]]:
    """`todo` in order, cut into runs of whole shards of at most `most` samples (a larger shard
    alone)."""
    groups: list[list[str]] = []
    size = 0
    for name in todo:
        n = int(shards[name].get("samples", 0))
        if not groups or size + n > most:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _embed_shards(
    source, data: str, manifest: dict, todo: list[str], cfg: Config, store: Store, next_id: int, verbose: bool
) -> tuple[dict[str, int], int]:
    """Embed the shards in `todo` (one Ray Data execution) and write one part per shard; returns
    {shard: vectors} and the next free id."""
    import ray

    from jepa_ray.eval.embed import check_dims, embedded, eval_pipeline
    from jepa_ray.stream.pipeline import build_dataset, new_ledger, open_split

    if not todo:
        return {}, next_id
    pcfg = eval_pipeline(cfg, source.info)
    by_split: dict[str, list[str]] = {}
    split_of = {s["name"]: s["split"] for s in manifest["shards"]}
    for name in todo:
        by_split.setdefault(split_of[name], []).append(name)
    ledger = new_ledger(pcfg.max_bad_samples)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in todo}
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in todo}
    try:
        datasets = []
        for split, names in by_split.items():
            whole = open_split(data, split, cfg.train.storage)
            check_dims(source, whole.spec.model_dims(pcfg), data)
            keep = [i for i, p in enumerate(whole.paths) if p.rsplit("/", 1)[-1] in set(names)]
            subset = replace(
                whole, paths=[whole.paths[i] for i in keep], expected={n: whole.expected[n] for n in names}
            )
            datasets.append(build_dataset(subset, pcfg, train=False, ledger=ledger, keep_shard=True))
        # an index and its queries read the export's target encoder whatever eval.encoder says, so
        # that a query is embedded as the archive was (jepa_ray.search.query)
        ds = embedded(datasets, source, cfg, "target", verbose)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            vec = vectors_from(batch, cfg.index.modality, cfg.index.vectors)
            for i, shard in enumerate(batch["shard"]):
                rows[str(shard)].append(
                    {"key": str(batch["key"][i]), **safe_meta(str(batch["meta"][i]), str(shard))}
                )
                vectors[str(shard)].append(vec[i])
    finally:
        ray.kill(ledger)
    counts = {}
    for name in todo:
        n = len(rows[name])
        ids = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n
        dim = len(vectors[name][0]) if n else 0
        vec = normalise(np.stack(vectors[name])) if n else np.zeros((0, dim), np.float32)
        table = pa.table(
            {
                "id": ids,
                **{c: [r.get(c) for r in rows[name]] for c in META},
                **{
                    c: [r.get(c) for r in rows[name]]
                    for c in sorted({k for r in rows[name] for k in r} - set(META))
                },
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), max(dim, 1))
                if n
                else pa.array([], pa.list_(pa.float32())),
            }
        )
        sink = io.BytesIO()
        pq.write_table(table, sink)
        store.write_bytes(part_name(name), sink.getvalue())
        counts[name] = n
        log.info("indexed %s: %d vectors", name, n)
    return counts, next_id


def read_part(store: Store, shard: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(part_name(shard))), columns=columns)


def part_vectors(table: pa.Table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(col), -1)


def new_faiss_index(kind: str, dim: int, total: int, nlist: int | None = None, sample=None):
    """An empty FAISS index for `total` vectors of `dim`: exact (flat, inner product, by id), or IVF
    with `nlist` lists (default 4 sqrt(total), at least 64, at most total / 39) trained on `sample`
    (a callable: most -> that many vectors at most)."""
    f = faiss()
    if kind == "exact":
        return f.IndexIDMap2(f.IndexFlatIP(dim))
    lists = nlist or max(64, int(4 * math.sqrt(total)))
    lists = max(1, min(lists, total // TRAIN_MIN))
    index = f.IndexIVFFlat(f.IndexFlatIP(dim), dim, lists, f.METRIC_INNER_PRODUCT)
    # k-means costs points x lists: 39 points a list (FAISS's minimum) up to 256, at most ~100k
    index.train(np.ascontiguousarray(sample(max(lists * TRAIN_MIN, min(lists * 256, 100_000))), np.float32))
    return index


def _new_index(kind: str, store: Store, shards: dict[str, dict], nlist: int | None, centres=None):
    dim = next(
        part_vectors(read_part(store, name, ["vector"])).shape[1]
        for name, v in shards.items()
        if v["vectors"]
    )
    total = sum(v["vectors"] for v in shards.values())
    return new_faiss_index(
        kind, dim, total, nlist, lambda most: _training_sample(store, shards, most, centres)
    )


def _part(store: Store, name: str, centres, ids: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """(ids or None, the comparable vectors) of one part."""
    t = read_part(store, name, ["id", "vector", "site"] if centres else ["id", "vector"])
    vec = comparable(part_vectors(t), t["site"].to_pylist() if centres else None, centres)
    return (t["id"].to_numpy() if ids else None), vec


def _training_sample(store: Store, shards: dict[str, dict], most: int, centres=None) -> np.ndarray:
    """Up to `most` comparable vectors drawn evenly from every part (k-means of the IVF lists)."""
    total = sum(v["vectors"] for v in shards.values())
    rng = np.random.default_rng(0)
    out = []
    for name, v in sorted(shards.items()):
        if not v["vectors"]:
            continue
        _, vec = _part(store, name, centres)
        take = max(1, round(len(vec) * min(1.0, most / total)))
        out.append(vec[rng.choice(len(vec), min(take, len(vec)), replace=False)])
    return np.ascontiguousarray(np.concatenate(out))


def exact_top(chunks, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k most similar vectors to each query, over (ids, vectors) chunks: brute force,
    one chunk in memory at a time."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for ids, vectors in chunks:
        sims = queries @ vectors.T
        if sims.shape[1] > k:  # the chunk's own k best first: a partial sort
            part = np.argpartition(-sims, k, axis=1)[:, :k]
            sims, cand = np.take_along_axis(sims, part, 1), np.asarray(ids)[part]
        else:
            cand = np.broadcast_to(np.asarray(ids), sims.shape)
        s, i = np.concatenate([best_s, sims], axis=1), np.concatenate([best_i, cand], axis=1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def tune_nprobe(
    index, chunks, queries: np.ndarray, start: int, target: float, k: int = 10
) -> tuple[int, float]:
    """The smallest nprobe (start, doubling, up to every list) whose recall@k against exact search
    reaches `target` on these queries; (nprobe, its recall). The index is left set to it."""
    truth = exact_top(chunks, queries, k)
    nprobe = min(start, index.nlist)
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = float(np.mean([len(set(found[i]) & set(truth[i])) / k for i in range(len(queries))]))
        if recall >= target or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, index.nlist)


def _part_chunks(store: Store, shards: dict[str, dict], centres=None):
    for name, v in sorted(shards.items()):
        if v["vectors"]:
            yield _part(store, name, centres, ids=True)


def _add_parts(index, store: Store, shards: dict[str, dict], centres=None) -> None:
    for ids, vec in _part_chunks(store, shards, centres):
        index.add_with_ids(vec, np.ascontiguousarray(ids, dtype=np.int64))


def load_faiss(store: Store, state: dict[str, Any]):
    """The index file, if it is the one index.json recorded (else None)."""
    if not store.exists(FAISS_FILE):
        return None
    blob = store.read_bytes(FAISS_FILE)
    if hashlib.sha256(blob).hexdigest() != state.get("faiss_sha256"):
        return None
    return faiss().deserialize_index(np.frombuffer(blob, dtype=np.uint8))
