"""What a linear Cox model reads from the EHR, raw and through a random-init encoder.

On the learning benchmark's cohort (`bench_learning.py --workdir W` writes it; this script reuses
it), cross-fitted over the internal site's train, val and test subjects with EHR and follow-up (5
folds), scored by Harrell's c-index within folds on those with both modalities (the subjects of
bench_learning's `internal_cv`):

1. the raw-EHR Cox model on parts of its features: the static features alone, with each frequent
   code's count, with each valued code's mean value, all of them, and the counts with one mean over
   every valued code (what a mean over tokens whose value embedding every code shares can keep);
2. a ridge Cox model (penalty by an inner 3-fold c-index) on the pooled EHR embedding of random-init
   tiny encoders, per `model.event_values` (shared: one value embedding for every event; per_code:
   each code's values also along a direction of its own), `--seeds` draws each.

    python benchmarks/bench_ehr_reads.py --workdir /tmp/blm-work --out benchmarks/results/ehr-reads.json

Pretraining is bench_learning's (`--set model.event_values=shared` for the former tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import hardware

os.environ.setdefault("JEPA_RAY_SALT", "benchmark-salt-not-secret-0123456789abcdef")

FOLDS = 5
POOL = ("train", "val", "test")
RAW_READS = {
    "statics": ("statics",),
    "statics_counts": ("statics", "counts"),
    "statics_means": ("statics", "means"),
    "all": ("statics", "counts", "means"),
    "statics_counts_one_mean": ("statics", "counts", "one_mean"),
}


def raw_parts(x: np.ndarray, n_static: int, n_valued: int) -> dict[str, np.ndarray]:
    """`raw_ehr_features`' columns by part: statics (numeric values and one-hot categories), the
    frequent codes' counts, the valued codes' mean values (NaN when none), and one mean over those
    means (0 for a code without values)."""
    means = x[:, x.shape[1] - n_valued :]
    return {
        "statics": x[:, :n_static],
        "counts": x[:, n_static : x.shape[1] - n_valued],
        "means": means,
        "one_mean": np.nan_to_num(means).mean(1, keepdims=True),
    }


def cross_fit_cindex(
    x: np.ndarray, time_: np.ndarray, event: np.ndarray, scored: np.ndarray, fold: np.ndarray, alphas=None
) -> float:
    """Harrell's c-index within folds, on the `scored` rows, of out-of-fold ridge Cox risks (alpha 1,
    the raw baseline's; or the best of `alphas` by an inner c-index)."""
    from bench_learning import out_of_fold_cox

    from jepa_ray.eval.survival import harrell

    risk = out_of_fold_cox(x, time_, event, fold, np.ones(len(x), bool), alphas or (1.0,))
    return float(harrell(time_[scored], event[scored], risk[scored], fold[scored]))


def main() -> int:
    import bench_learning as bl
    import torch

    from jepa_ray.config import ModelConfig, StorageConfig, load_config
    from jepa_ray.eval.features import frequent_codes, raw_ehr_features
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.model.tokenizers import EVENT_VALUES, InputDims
    from jepa_ray.shards.manifest import read_manifest
    from jepa_ray.storage import Store
    from jepa_ray.stream.transform import FeatureSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="bench_learning's --workdir (its cohort)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shards = args.workdir / "shards"
    if not (shards / "manifest.json").exists():
        raise SystemExit(f"--workdir {args.workdir}: no shards; run bench_learning.py --workdir there first")
    t0 = time.perf_counter()
    cfg = load_config(
        overrides=["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=32"]
    ).pipeline
    held, spec = {}, None
    for name in POOL:
        spec, samples = bl.load_split(shards, name, cfg)
        held[name] = bl.batches_of(samples, list(samples), spec, cfg)
    manifest = read_manifest(Store(str(shards), StorageConfig()))
    splits = bl.held_splits(held)
    raw = raw_ehr_features(splits, manifest, "train")
    fs = FeatureSpec.from_manifest(manifest)
    n_static = len(fs.num_names) + sum(fs.cat_sizes)
    top, valued = frequent_codes(splits["train"], manifest)
    n_valued = len(valued)
    assert raw["train"].shape[1] == n_static + len(top) + n_valued

    def pooled(s: dict, col: str) -> np.ndarray:
        return np.concatenate([s[k].cols[col] for k in POOL])

    tte = [splits[k].tte("death") for k in POOL]
    time_ = np.concatenate([t for t, _ in tte])
    event = np.concatenate([e for _, e in tte])
    rows = ~np.isnan(time_) & (time_ > 0) & pooled(splits, "has_ehr").astype(bool)
    scored = pooled(splits, "has_image").astype(bool)[rows]
    time_, event = time_[rows], event[rows]
    fold = np.random.default_rng(0).permutation(len(time_)) % FOLDS
    parts = raw_parts(np.concatenate([raw[k] for k in POOL])[rows], n_static, n_valued)
    results: dict = {"raw": {}, "random_init_pooled": {}}
    for read, names in RAW_READS.items():
        x = np.concatenate([parts[n] for n in names], 1)
        results["raw"][read] = cross_fit_cindex(x, time_, event, scored, fold)
        print(f"raw {read:<24} {results['raw'][read]:.3f}", flush=True)
    dims = InputDims.from_dict(spec.model_dims(cfg))
    keys = pooled(splits, "key")
    for mode in EVENT_VALUES:
        got = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = JEPA(dims, ModelConfig(preset="tiny", event_values=mode))
            emb = bl.held_splits(held, model)
            assert np.array_equal(pooled(emb, "key"), keys)  # the same subjects in the same order
            x = pooled(emb, "emb_ehr")[rows]
            got.append(cross_fit_cindex(x, time_, event, scored, fold, bl.EMBEDDING_ALPHAS))
        results["random_init_pooled"][mode] = got
        print(f"random init, event_values={mode:<9} {np.round(got, 3).tolist()}", flush=True)
    doc = {
        "name": "ehr_reads",
        "hardware": hardware(),
        "config": {
            "workdir": str(args.workdir),
            "seeds": args.seeds,
            "folds": FOLDS,
            "subjects": len(time_),
            "scored": int(scored.sum()),
            "static_columns": n_static,
            "valued_codes": n_valued,
            "frequent_codes": len(top),
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
