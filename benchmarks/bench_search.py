"""Similar-case search: speed of the index at archive scale, and whether neighbours are similar cases.

speed — System: jepa-ray's FAISS indexes (`jepa_ray.search.index.new_faiss_index`: exact flat, and
IVF with the default lists and the nprobe `jepa-ray index` chooses: the fewest lists, from 8 doubling,
whose recall@10 reaches index.recall_target on 256 of the indexed vectors) over n synthetic unit vectors (a mixture of 1,000
clusters, dimension 384: ViT-S's width) at n = 10^4, 10^5, 10^6. Baseline: exact brute force in
numpy on the same vectors (one matrix product and a partial sort per batch of queries), measured in
the same run. Reported: build time and rate, queries/s (batches of 1,000 queries), recall@10 of
IVF against exact, index memory (serialised bytes).
ratio = IVF queries/s / brute-force queries/s at the largest n (higher is better), with its
recall@10 (target >= 0.95).

quality — System: the demo's test split queried against its train split (the historical cases)
with the demo's pretrained JEPA (and more pretraining seeds, --pretrained), its MAE baseline (same
data, masks, steps) and random inits (3 seeds), each image as what `jepa-ray index` can index:
`pooled` (index.vectors=pooled), `regions` (index.vectors=regions), each as embedded
(index.centre=none), `_site_centred` (index.centre=site, what `index` compares), `_centred` (one
archive mean for every site) and `_whitened` (PCA-whitening fit on the archive); beside raw pixels
(the input ceiling). Per query, the k = 10 nearest training cases: their mean distance to the
query in the synthetic cohort's ground-truth latent space (standardised), over the mean distance
of random pairs (lower is better; 1 = no better than chance), and precision@10 of same-label
neighbours for each binary label, over the label's base rate. The summary gives each encoder
group's min-max over seeds.

    python benchmarks/bench_search.py speed [--quick] [--out FILE.json]
    python benchmarks/bench_search.py quality --demo DIR [--pretrained ENC ...] [--out FILE.json]
        # DIR: a `jepa-ray demo --out DIR`; ENC: exports of more pretraining seeds on its shards
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import hardware

DIM = 384
K = 10


def _vectors(n: int, rng: np.random.Generator, centers: np.ndarray | None) -> np.ndarray:
    """Unit vectors: a mixture around `centers`, or, with None, isotropic (no structure at all:
    the worst case for IVF, whose lists assume the vectors cluster)."""
    noise = rng.standard_normal((n, DIM), np.float32)
    v = noise if centers is None else centers[rng.integers(0, len(centers), n)] + 0.35 * noise
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _brute(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(q), 250):
        s = q[i : i + 250] @ x.T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.take_along_axis(s, top, 1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(top, order, 1))
    return np.concatenate(out), len(q) / (time.perf_counter() - t0)


def speed(sizes: list[int], queries: int, isotropic: bool = False) -> dict:
    import faiss

    from jepa_ray.config import IndexConfig
    from jepa_ray.search.index import new_faiss_index, tune_nprobe

    rng = np.random.default_rng(0)
    centers = None if isotropic else rng.standard_normal((1000, DIM)).astype(np.float32)
    q = _vectors(queries, rng, centers)
    recall_target = IndexConfig().recall_target
    rows = []
    for n in sizes:
        x = _vectors(n, rng, centers)
        truth, brute_qps = _brute(x, q, K)
        row = {"n": n, "dim": DIM, "brute_force_qps": brute_qps}
        for kind in ("exact", "ivf"):
            t0 = time.perf_counter()

            def sample(most: int, x=x, n=n) -> np.ndarray:
                return x[rng.choice(n, min(most, n), replace=False)]

            index = new_faiss_index(kind, DIM, n, None, sample)
            index.add_with_ids(x, np.arange(n, dtype=np.int64))
            build = time.perf_counter() - t0
            if kind == "ivf":  # as `jepa-ray index` does: nprobe for the recall target on 256 of its vectors
                t1 = time.perf_counter()
                probe = x[rng.choice(n, 256, replace=False)]
                chunks = (
                    (np.arange(i, min(i + 100_000, n)), x[i : i + 100_000]) for i in range(0, n, 100_000)
                )
                tune_nprobe(index, chunks, probe, 8, recall_target)
                tuning = time.perf_counter() - t1
            t0 = time.perf_counter()
            _, found = index.search(q, K)
            qps = queries / (time.perf_counter() - t0)
            recall = float(np.mean([len(set(found[i]) & set(truth[i])) / K for i in range(queries)]))
            row[kind] = {
                "build_s": build,
                "vectors_per_s": n / build,
                "qps": qps,
                "vs_brute_force": qps / brute_qps,
                "recall_at_10": recall,
                "bytes": int(faiss.serialize_index(index).nbytes),
                **(
                    {"nlist": index.nlist, "nprobe": index.nprobe, "tuning_s": tuning}
                    if kind == "ivf"
                    else {}
                ),
            }
            del index
        rows.append(row)
        ivf = row["ivf"]
        print(
            f"n={n:>8}: brute {brute_qps:8.0f} q/s | exact {row['exact']['qps']:8.0f} q/s "
            f"build {row['exact']['build_s']:.1f}s | IVF {ivf['qps']:8.0f} q/s ({ivf['vs_brute_force']:.1f}x) "
            f"recall@10 {ivf['recall_at_10']:.3f} build {ivf['build_s']:.1f}s, "
            f"{ivf['bytes'] / 2**20:.0f} MiB, nlist {ivf['nlist']} nprobe {ivf['nprobe']}",
            flush=True,
        )
    last = rows[-1]["ivf"]
    return {
        "rows": rows,
        "ratio": last["vs_brute_force"],
        "recall_at_10": last["recall_at_10"],
        "meets_target": last["recall_at_10"] >= 0.95,
    }


def quality(demo: Path, seeds: int = 3, pretrained: list[Path] | None = None) -> dict:
    """Neighbours of test-split queries among the training cases, per encoder; `pretrained`: more
    pretraining seeds of the demo's JEPA (exports), as pretrained_1, pretrained_2, ..."""
    import pandas as pd
    import ray

    from jepa_ray.config import load_config
    from jepa_ray.eval.embed import EncoderSource, extract, read_embeddings
    from jepa_ray.eval.evaluate import LATENTS, resolve_encoder
    from jepa_ray.ingest.deid import Pseudonymizer

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    salt = [f"prepare.deid.salt_file={demo / 'salt'}"] if (demo / "salt").exists() else []
    import jepa_ray

    cfg = load_config(Path(jepa_ray.__file__).parent / "configs" / "demo-cpu.yaml", salt)
    shards = str(demo / "shards")
    pz = Pseudonymizer(cfg.prepare.deid.resolve_salt())
    table = pd.read_parquet(demo / "cohort" / "latents.parquet")
    factors = list(LATENTS)
    values = table[factors].to_numpy(float)
    values = (values - values.mean(0)) / values.std(0)  # each factor standardised
    z = {pz.subject(sid): values[i] for i, sid in enumerate(table["subject_id"])}
    work = demo / "bench-search"
    pre = resolve_encoder(str(demo / "encoder.safetensors"), cfg, work)
    sources = [pre]
    for i, path in enumerate(pretrained or [], start=1):
        sources.append(resolve_encoder(str(path), cfg, work, name=f"pretrained_{i}"))
    if (demo / "mae.safetensors").exists():
        sources.append(resolve_encoder(str(demo / "mae.safetensors"), cfg, work, name="mae"))
    sources += [EncoderSource(f"random_init_{s}", None, pre.info, seed=s) for s in range(seeds)]
    out = {"factors": factors, "k": K, "encoders": {}}
    raw = _raw_images(Path(shards))
    for src in sources:
        paths = extract(src, shards, ["train", "test"], cfg, work)
        tr, te = read_embeddings(paths["train"]), read_embeddings(paths["test"])
        keep_tr, keep_te = tr["has_image"].astype(bool), te["has_image"].astype(bool)
        meta_a = [json.loads(m) for m in tr["meta"][keep_tr]]
        meta_q = [json.loads(m) for m in te["meta"][keep_te]]
        # the shards carry subject pseudonyms: the cohort's ids pseudonymised with the demo's salt
        za = np.stack([z[m["subject"]] for m in meta_a])
        zq = np.stack([z[m["subject"]] for m in meta_q])
        variants = {
            "pooled": (tr["emb_image"][keep_tr], te["emb_image"][keep_te]),
            # the regions x regions grid of patch tokens, each layer-normed, concatenated: the layout kept
            "regions": (_regions(tr, keep_tr), _regions(te, keep_te)),
        }
        if not out["encoders"]:  # the raw-input ceiling: the stored pixels at 16 x 16, standardised
            variants_raw = (
                np.stack([raw[k] for k in tr["key"][keep_tr]]),
                np.stack([raw[k] for k in te["key"][keep_te]]),
            )
            out["raw_pixels"] = _neighbour_quality(*variants_raw, za, zq, meta_a, meta_q, factors)
            out["raw_pixels_whitened"] = _neighbour_quality(
                *_whiten(*variants_raw), za, zq, meta_a, meta_q, factors
            )
            print("raw_pixels", json.dumps(out["raw_pixels"]), flush=True)
        # hypothesis 2: the archive's own statistics, no labels: PCA-whitening fit on the archive
        # (every direction of the embedding equally weighted, so that the few directions a
        # nuisance such as the site's detector dominates no longer decide the nearest cases), and
        # per-site centring (each vector minus its site's archive mean)
        for name in ("pooled", "regions"):
            xa, xq = variants[name]
            variants[f"{name}_whitened"] = _whiten(xa, xq)
            variants[f"{name}_site_centred"] = _site_centre(xa, xq, meta_a, meta_q)
            variants[f"{name}_centred"] = _site_centre(xa, xq, [{}] * len(xa), [{}] * len(xq))  # one mean
        out["encoders"][src.name] = {
            name: _neighbour_quality(xa, xq, za, zq, meta_a, meta_q, factors)
            for name, (xa, xq) in variants.items()
        }
        print(src.name, json.dumps(out["encoders"][src.name]), flush=True)
    ray.shutdown()
    out["summary"] = _summary(out)
    for line in out["summary"]["lines"]:
        print(line)
    return out


def _summary(out: dict) -> dict:
    """Per variant: the latent-distance ratio (all factors, cardiac, lung) of the pretrained seeds
    and of the random inits, min-max over seeds, with the MAE and the raw pixels beside."""
    groups = {"pretrained": [], "random_init": [], "mae": []}
    for name in out["encoders"]:
        for g in groups:
            if name == g or name.startswith(g + "_"):
                groups[g].append(name)
    rows, lines = {}, []
    variants = next(iter(out["encoders"].values())).keys()
    for variant in variants:
        rows[variant] = {}
        for g, names in groups.items():
            vals = [out["encoders"][n][variant] for n in names]
            if not vals:
                continue
            ratios = {
                "all": [v["latent_distance_ratio"] for v in vals],
                "cardiac": [v["per_factor_ratio"]["cardiac"] for v in vals],
                "lung": [v["per_factor_ratio"]["lung"] for v in vals],
            }
            rows[variant][g] = {m: [min(r), max(r)] for m, r in ratios.items()}
        cells = [
            f"{g} {rows[variant][g]['all'][0]:.3f}-{rows[variant][g]['all'][1]:.3f} "
            f"(lung {rows[variant][g]['lung'][0]:.3f}-{rows[variant][g]['lung'][1]:.3f})"
            for g in groups
            if g in rows[variant]
        ]
        lines.append(f"{variant:22s} " + " | ".join(cells))
    raw = out.get("raw_pixels_whitened", {})
    if raw:
        lines.append(
            f"{'raw pixels whitened':22s} {raw['latent_distance_ratio']:.3f} (lung {raw['per_factor_ratio']['lung']:.3f})"
        )
    return {"ratios_min_max": rows, "lines": lines}


def _whiten(xa: np.ndarray, xq: np.ndarray, energy: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
    """PCA-whitening fit on the archive xa (after L2 normalisation), applied to both: the
    components holding `energy` of the variance, each scaled to unit variance."""
    xa = xa / np.linalg.norm(xa, axis=1, keepdims=True)
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    mean = xa.mean(0)
    _, sv, vt = np.linalg.svd(xa - mean, full_matrices=False)
    var = sv**2 / len(xa)
    keep = int(np.searchsorted(np.cumsum(var) / var.sum(), energy)) + 1
    w = vt[:keep].T / np.sqrt(var[:keep] + 1e-6 * var[0])
    return (xa - mean) @ w, (xq - mean) @ w


def _site_centre(xa, xq, meta_a, meta_q) -> tuple[np.ndarray, np.ndarray]:
    """What `jepa-ray index` compares with index.centre=site: each vector minus its site's archive
    mean (the archive's overall mean for a site the archive lacks), normalised."""
    from jepa_ray.search.index import ALL_SITES, comparable, normalise

    xa = normalise(xa)
    sa = [m.get("site", "") for m in meta_a]
    present = np.linalg.norm(xa, axis=1) > 0
    centres = {s: xa[present & (np.array(sa) == s)].mean(0) for s in set(sa)}
    centres[ALL_SITES] = xa[present].mean(0)
    return comparable(xa, sa, centres), comparable(xq, [m.get("site", "") for m in meta_q], centres)


def _regions(emb: dict, keep: np.ndarray) -> np.ndarray:
    """What `jepa-ray index` indexes with index.vectors=regions."""
    from jepa_ray.search.index import vectors_from

    return vectors_from(
        {"emb_image": emb["emb_image"][keep], "img_tokens": emb["img_tokens"][keep]}, "image", "regions"
    )


def _raw_images(shards: Path) -> dict[str, np.ndarray]:
    """key -> the stored image average-pooled to 16 x 16, flattened and standardised."""
    import io
    import tarfile

    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if ext == "image.npy":
                    a = np.load(io.BytesIO(tf.extractfile(m).read()))[0].astype(np.float32)
                    s = a.shape[0] // 16
                    v = a[: s * 16, : s * 16].reshape(16, s, 16, s).mean((1, 3)).ravel()
                    out[key] = (v - v.mean()) / (v.std() + 1e-6)
    return out


def _neighbour_quality(xa, xq, za, zq, meta_a, meta_q, factors) -> dict:
    """The k nearest archive cases of each query (cosine): latent distance over random pairs (all
    factors, and each), and precision@k of label-positive queries with the label's base rate."""
    xa = xa / np.linalg.norm(xa, axis=1, keepdims=True)
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    nn = np.argsort(-(xq @ xa.T), axis=1)[:, :K]
    rng = np.random.default_rng(0)
    ia, iq = rng.integers(0, len(za), 20000), rng.integers(0, len(zq), 20000)
    near = np.mean([np.linalg.norm(za[nn[i]] - zq[i], axis=1).mean() for i in range(len(xq))])
    rand = np.mean(np.linalg.norm(za[ia] - zq[iq], axis=1))
    per = {
        f: float(
            np.mean([np.abs(za[nn[i], j] - zq[i, j]).mean() for i in range(len(xq))])
            / np.mean(np.abs(za[ia, j] - zq[iq, j]))
        )
        for j, f in enumerate(factors)
    }
    prec = {}
    for lab in sorted({k for m in meta_a for k in (m.get("labels") or {})}):
        ya = np.array([(m.get("labels") or {}).get(lab, -1) for m in meta_a])
        yq = np.array([(m.get("labels") or {}).get(lab, -1) for m in meta_q])
        pos = np.flatnonzero(yq == 1)
        if len(pos):
            prec[lab] = {
                "precision_at_10": float(np.mean([(ya[nn[i]] == 1).mean() for i in pos])),
                "base_rate": float((ya == 1).mean()),
            }
    return {
        "latent_distance_ratio": float(near / rand),
        "per_factor_ratio": per,
        "precision_at_10": prec,
        "queries": len(xq),
        "archive": len(xa),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["speed", "quality"])
    ap.add_argument("--quick", action="store_true", help="speed: 10^4 and 10^5 vectors only")
    ap.add_argument("--isotropic", action="store_true", help="speed: unclustered vectors (IVF's worst case)")
    ap.add_argument("--demo", type=Path, help="quality: the output directory of a `jepa-ray demo` run")
    ap.add_argument(
        "--pretrained", type=Path, action="append", help="quality: another pretraining seed's export"
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.what == "speed":
        doc = speed([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000], 1000, args.isotropic)
        doc["vectors"] = "isotropic" if args.isotropic else "mixture of 1,000 clusters"
        print(
            f"ratio: IVF / brute-force queries/s at the largest n = {doc['ratio']:.1f} (recall@10 {doc['recall_at_10']:.3f}, target >= 0.95)"
        )
    else:
        if args.demo is None:
            ap.error("quality needs --demo DIR")
        doc = quality(args.demo, pretrained=args.pretrained)
    doc = {"benchmark": f"search {args.what}", "hardware": hardware(), **doc}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
