"""Which label-free objective ranks pretraining settings the way the ground truth does?

The sweep of `bench_tune.py` (mask ratio x predictor depth) in one process, on the learning
benchmark's cohort (1,600 synthetic subjects, 32 px, the tiny model), against a reference that is
not itself mostly noise. `bench_tune.py` ranks trials by a probe AUROC on 128 validation samples,
whose spread across settings is no larger than its own standard error; here every setting's
encoder is scored by the attentive probe's out-of-fold R² of the 4 latent factors the images were
drawn from (cardiac, lung, frailty, mass; `jepa_ray.eval.attentive`, 5 folds grouped by subject,
over the training split's ~1,240 images), averaged over the factors.

Per seed and setting: --steps single-process steps of `jepa_ray.model.optim.train_step` (batch
32, lr 1e-3, the default EMA; every setting of a seed starts from the same initialisation), then
every label-free objective of `jepa_ray.tune.labelfree` on the validation split (reference masks,
as `jepa-ray tune` measures them) and the final training loss. The grid: mask ratio x predictor
depth (`--grid depth`, bench_tune's) or mask ratio x learning rate (`--grid lr`; depth 2).
Reported: Spearman of each objective with the reference across the 12 settings, per seed and for the settings' means over
seeds; the reference's own agreement between seeds (how much ranking there is to find).

`--grid collapse` instead trains settings that shrink the embeddings (no SIGReg, no EMA, a high
learning rate) beside the default and reports whether `jepa-ray tune`'s collapse guard flags each
one that `val_loss` alone would rank above the default.

    python benchmarks/bench_labelfree.py [--grid depth|lr|collapse] [--seeds K] [--first-seed N] [--probe-seeds P]
        [--steps S] [--workdir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_learning as bl
from bench_prepare import hardware

MASK_RATIOS = (0.3, 0.5, 0.7, 0.85)
GRIDS = {  # the second axis beside the mask ratio: bench_tune's, or the learning rate
    "depth": ("predictor_depth", (1, 2, 4)),
    "lr": ("lr", (3e-4, 1e-3, 3e-3)),
}
OBJECTIVES = ("rankme", "lidar", "lidar_context", "val_loss")
# --grid collapse: settings that shrink the embeddings (no SIGReg; no EMA; a high learning rate),
# beside the default, at mask ratio 0.5: model overrides and learning rate
COLLAPSE = {
    "default": ({}, 1e-3),
    "no SIGReg, no EMA": ({"sigreg": 0.0, "ema": (0.0, 0.0)}, 1e-3),
    "no SIGReg, no EMA, lr 1e-2": ({"sigreg": 0.0, "ema": (0.0, 0.0)}, 1e-2),
    "no SIGReg, lr 3e-2": ({"sigreg": 0.0}, 3e-2),
}
TARGET = 0.7  # Spearman(label-free objective, reference) across settings
BASE = ["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=32"]


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def one_setting(
    train,
    spec,
    mask: float,
    depth: int | None,
    lr: float,
    steps: int,
    seed: int,
    probe,
    val,
    z,
    groups,
    model_kw: dict | None = None,
    probe_seeds: int = 1,
) -> dict:
    """Pretrain one setting from seed's initialisation; its reference, objectives and the collapse
    guard's verdict (against the initialisation, as `jepa-ray tune` judges a trial). The reference
    averages `probe_seeds` fits of the attentive probe (`bench_learning.readouts`)."""
    import torch

    from jepa_ray.config import ModelConfig, load_config
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.train.local import train_on_samples
    from jepa_ray.tune import labelfree
    from jepa_ray.tune.objective import pooled_embeddings

    cfg = load_config(overrides=[*BASE, f"pipeline.mask.mask_ratio={mask}"]).pipeline
    reference_mask = load_config(overrides=BASE).pipeline.mask  # the same questions for every setting
    torch.manual_seed(seed)
    model = JEPA(spec.model_dims(cfg), ModelConfig(preset="tiny", predictor_depth=depth, **(model_kw or {})))
    start = labelfree.health(pooled_embeddings(model, val))
    t = time.perf_counter()
    losses = train_on_samples(model, train, spec, cfg, steps, lr=lr, batch=32, seed=seed)
    train_s = time.perf_counter() - t
    pooled, tokens = bl.image_views(model, probe)
    model.eval()
    both = pooled_embeddings(model, val)
    now = labelfree.health(both)
    scores = labelfree.scores(list(OBJECTIVES), model, val, reference_mask, both)
    read = bl.readouts(pooled, tokens, z, groups, seed, probe_seeds)
    return {
        "setting": {"mask_ratio": mask, "predictor_depth": depth, "lr": lr},
        "seed": seed,
        **read,  # linear, attentive (and each probe fit), kNN
        "scores": {k: {"value": v[0], "se": v[1]} for k, v in scores.items()},
        "start": start,
        "spread": now["spread"],
        "collapsed": labelfree.collapsed(now, start),
        "loss_last10": float(np.mean(losses[-10:])),
        "train_s": train_s,
    }


def analyse(rows: list[dict], seeds: list[int]) -> dict:
    """Spearman of every objective with each reference: the mean attentive, linear and kNN R²."""

    def key(r: dict) -> tuple:
        return tuple(r["setting"].values())

    settings = sorted({key(r) for r in rows}, key=str)

    def table(seed: int | None, get) -> list[float]:
        """Per setting: `get` of that seed's row, or its mean over seeds (seed None)."""
        return [
            float(np.mean([get(r) for r in rows if key(r) == s and seed in (None, r["seed"])]))
            for s in settings
        ]

    refs = {
        "attentive": lambda r: float(np.mean(list(r["attentive"].values()))),
        "linear": lambda r: float(np.mean(list(r["linear"].values()))),
        "knn": lambda r: float(np.mean(list(r["knn"].values()))),
    }
    scores = {name: (lambda r, n=name: r["scores"][n]["value"]) for name in OBJECTIVES}
    scores["train_loss"] = lambda r: -r["loss_last10"]
    out: dict = {"settings": [list(s) for s in settings], "spearman": {}, "reference_between_seeds": {}}
    for ref, get_ref in refs.items():
        out["spearman"][ref] = {
            name: {
                "per_seed": [spearman(table(s, get), table(s, get_ref)) for s in seeds],
                "seed_mean": spearman(table(None, get), table(None, get_ref)) if len(seeds) > 1 else None,
            }
            for name, get in scores.items()
        }
        out["reference_between_seeds"][ref] = [
            spearman(table(a, get_ref), table(b, get_ref)) for a, b in combinations(seeds, 2)
        ]
    return out


def collapse_check(args, train, spec, probe, val, z, groups, seeds: list[int]) -> int:
    """--grid collapse: per seed, each COLLAPSE setting's val_loss, RankMe, spread, the guard's verdict
    and the attentive R²; says whether the guard flags exactly the settings val_loss prefers
    over the default while reading the factors worse."""
    rows = []
    for seed in seeds:
        for name, (model_kw, lr) in COLLAPSE.items():
            r = one_setting(train, spec, 0.5, None, lr, args.steps, seed, probe, val, z, groups, model_kw)
            r["setting"]["name"] = name
            rows.append(r)
            print(
                f"seed {seed} {name:<28} val_loss {r['scores']['val_loss']['value']:+.3f}  RankMe "
                f"{r['scores']['rankme']['value']:.1f} (start {r['start']['rankme']:.1f})  spread "
                f"{r['spread']:.3f} (start {r['start']['spread']:.3f})  attentive R² "
                f"{np.mean(list(r['attentive'].values())):.3f}  guard: {r['collapsed'] or 'healthy'}",
                flush=True,
            )

    def read(r: dict) -> float:
        return float(np.mean(list(r["attentive"].values())))

    def loss(r: dict) -> float:
        return r["scores"]["val_loss"]["value"]

    # a "fooled" setting: val_loss ranks it above the default, the ground truth below
    fooled, flagged = [], []
    for seed in seeds:
        mine = {r["setting"]["name"]: r for r in rows if r["seed"] == seed}
        ref = mine["default"]
        for name, r in mine.items():
            if r["collapsed"]:
                flagged.append([seed, name])
            if name != "default" and loss(r) > loss(ref) and read(r) < read(ref):
                fooled.append([seed, name])
    print(
        f"val_loss fooled (better than the default, worse attentive R²): {fooled}; guard flagged: {flagged}"
    )
    report = {
        "name": "labelfree-collapse",
        "hardware": hardware(),
        "config": {"seeds": seeds, "steps": args.steps, "subjects": args.subjects, "batch": 32,
                   "settings": {k: {"model": v[0], "lr": v[1]} for k, v in COLLAPSE.items()}},
        "results": {"rows": rows, "fooled": fooled, "flagged": flagged},
        "guard_catches_every_fooled": all(f in flagged for f in fooled),
        "guard_spares_the_default": not any(name == "default" for _, name in flagged),
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


def probe_set(work: Path, shards: Path, cfg) -> tuple:
    """What the reference reads: the learning cohort's training split (`bl.cohort` in `work`) as
    (spec, samples, evaluation batches of its images, their ground-truth latents (N, 4), their
    subjects: the probe's fold groups)."""
    import pandas as pd

    from jepa_ray.ingest.deid import Pseudonymizer

    spec, train = bl.load_split(shards, "train", cfg)
    latents = pd.read_parquet(work / "cohort" / "latents.parquet")
    pz = Pseudonymizer(os.environ["JEPA_RAY_SALT"].encode())
    truth = {pz.subject(r.subject_id): [getattr(r, f) for f in bl.FACTORS] for r in latents.itertuples()}
    keys = [k for k, f in train.items() if "image" in f]
    groups = [json.loads(train[k]["meta"])["subject"] for k in keys]
    z = np.array([truth[s] for s in groups], float)
    return spec, train, bl.batches_of(train, keys, spec, cfg), z, groups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--first-seed", type=int, default=0, help="run seeds first .. first + seeds - 1 (default 0)"
    )
    ap.add_argument(
        "--probe-seeds",
        type=int,
        default=1,
        help="fits of the attentive probe averaged into each setting's reference (default 1)",
    )
    ap.add_argument(
        "--grid",
        choices=[*sorted(GRIDS), "collapse"],
        default="depth",
        help="the axis beside the mask ratio; collapse: the collapse guard against settings that shrink the embeddings",
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--subjects", type=int, default=1600)
    ap.add_argument("--workdir", type=Path, default=None, help="reuse the learning benchmark's cohort")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from jepa_ray.config import load_config

    torch.set_num_threads(os.cpu_count() or 1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-labelfree-"))
    shards = bl.cohort(work, args.subjects)
    cfg = load_config(overrides=BASE).pipeline
    spec, train, probe, z, groups = probe_set(work, shards, cfg)
    _, val_samples = bl.load_split(shards, "val", cfg)
    val = bl.batches_of(val_samples, list(val_samples), spec, cfg, size=16)

    rows = []
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.grid == "collapse":
        return collapse_check(args, train, spec, probe, val, z, groups, seeds)
    axis, values = GRIDS[args.grid]
    for seed in seeds:
        for mask in MASK_RATIOS:
            for v in values:
                depth, lr = (v, 1e-3) if axis == "predictor_depth" else (None, v)
                r = one_setting(
                    train, spec, mask, depth, lr, args.steps, seed, probe, val, z, groups,
                    probe_seeds=args.probe_seeds,
                )  # fmt: skip
                rows.append(r)
                print(
                    f"seed {seed} mask {mask:<4} {axis} {v}: attentive R² "
                    + " ".join(f"{v:+.3f}" for v in r["attentive"].values())
                    + "  "
                    + "  ".join(f"{k} {v['value']:.3f}" for k, v in r["scores"].items())
                    + f"  ({r['train_s']:.0f} s)",
                    flush=True,
                )
    result = analyse(rows, seeds)
    print("Spearman with the reference across the 12 settings (per seed; settings' means over seeds):")
    for ref, per in result["spearman"].items():
        for name, v in per.items():
            mean = "" if v["seed_mean"] is None else f"; means {v['seed_mean']:+.2f}"
            print(f"  {ref:<10}{name:<15}" + " ".join(f"{x:+.2f}" for x in v["per_seed"]) + mean)
        between = result["reference_between_seeds"][ref]
        print(f"  {ref:<10}{'(reference, seed vs seed)':<15} " + " ".join(f"{x:+.2f}" for x in between))
    best = max(result["spearman"]["attentive"].items(), key=lambda kv: float(np.mean(kv[1]["per_seed"])))
    ratio = float(np.mean(best[1]["per_seed"]))
    print(f"best objective: {best[0]} (mean Spearman {ratio:+.2f} against the attentive R²; target {TARGET})")
    report = {
        "name": "labelfree",
        "hardware": hardware(),
        "config": {
            "seeds": seeds,
            "probe_seeds": args.probe_seeds,
            "steps": args.steps,
            "subjects": args.subjects,
            "batch": 32,
            "grid": {"mask_ratio": list(MASK_RATIOS), axis: list(values)},
        },
        "results": {"rows": rows, **result},
        "best": best[0],
        "ratio": ratio,
        "target": TARGET,
        "meets_target": bool(ratio >= TARGET),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
