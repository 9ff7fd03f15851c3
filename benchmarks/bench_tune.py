"""A Ray Tune sweep of mask ratio x predictor depth on the synthetic cohort: what ASHA saves, which
setting wins, and whether the label-free objective (RankMe) agrees with a labelled one.

System: `jepa_ray.tune.sweep` on a local Ray (all CPUs), trials of one Ray Train worker (ZeRO-2,
tiny model, 32 px), objective = out-of-fold logistic-probe AUROC of cardiomegaly on the validation
split, measured every --eval-every steps; ASHA (grace --grace steps, reduction factor 2).
Baselines: the grid point of the default config (mask ratio 0.5, predictor depth 2), measured in
the same sweep; best / default compares both at the last step the default trial reached (ASHA may
stop it early, and the objective moves with training). Compute: steps run vs every trial run to
the end.

    python benchmarks/bench_tune.py [--quick] [--out FILE.json]

Writes the sweep's results table, heat map and sweep.json next to FILE.json (results/tune/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import hardware

os.environ.setdefault("JEPA_RAY_SALT", "benchmark-salt-not-secret")
MASK_RATIOS = (0.3, 0.5, 0.7, 0.85)
DEPTHS = (1, 2, 4)
DEFAULT = (0.5, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 x 2 grid, 200 subjects, 60 steps")
    ap.add_argument("--subjects", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--grace", type=int, default=30)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    subjects = args.subjects or (200 if args.quick else 400)
    steps = args.steps or (60 if args.quick else 150)
    masks, depths = ((0.3, 0.5), (1, 2)) if args.quick else (MASK_RATIOS, DEPTHS)

    import ray

    from jepa_ray.config import SynthConfig, load_config
    from jepa_ray.data.prepare import prepare
    from jepa_ray.data.synth import cohort_inputs, write_cohort
    from jepa_ray.tune.sweep import sweep

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    t0 = time.perf_counter()
    write_cohort(work / "cohort", SynthConfig(subjects=subjects, seed=5, sites=3, min_size=128, max_size=256))
    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING"
    )
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        pc = load_config(
            overrides=["prepare.image.size=64", "prepare.shards.max_samples=32", "prepare.split.val=0.3"]
        ).prepare
        prepare(str(shards), pc, **cohort_inputs(work / "cohort"))
    setup_s = time.perf_counter() - t0

    space = (
        f"tune.space={{pipeline.mask.mask_ratio: {{values: {list(masks)}}}, "
        f"model.predictor_depth: {{values: {list(depths)}}}}}"
    )
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tune-demo.yaml",
        overrides=[
            f"train.shards={shards}",
            f"train.storage_path={work / 'sweeps'}",
            f"train.steps={steps}",
            f"train.warmup_steps={max(steps // 10, 1)}",
            f"train.checkpoint_every={steps}",
            space,
            "tune.objective=probe_auroc",
            "tune.label=cardiomegaly",
            f"tune.eval_every={args.eval_every}",
            f"tune.asha.grace_period={args.grace}",
        ],
    )
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    t = time.perf_counter()
    info = sweep(cfg, name=name)
    sweep_s = time.perf_counter() - t
    ray.shutdown()

    rows = info.rows
    default = next(
        (r for r in rows if (r["pipeline.mask.mask_ratio"], r["model.predictor_depth"]) == DEFAULT), None
    )
    ran = sum(r["steps"] for r in rows)
    full = len(rows) * steps
    best = info.best
    ratio, at = None, None
    if best is not None and default is not None:
        at = default["steps"]

        def value_at(trial: str) -> float | None:
            seen = [o for s, o, _ in info.history[trial] if s <= at and o is not None]
            return seen[-1] if seen else None

        b, d = value_at(best["trial"]), value_at(default["trial"])
        ratio = b / d if b is not None and d else None
    print(f"{len(rows)} trials in {sweep_s:.0f} s; setup (synth + prepare) {setup_s:.0f} s")
    print(f"steps run / steps without early stopping: {ran} / {full} = {ran / full:.2f}")
    print(f"stopped early by ASHA: {sum(r['stopped_early'] for r in rows)} of {len(rows)}")
    if best is not None:
        print(
            f"best: mask_ratio {best['pipeline.mask.mask_ratio']}, predictor_depth "
            f"{best['model.predictor_depth']}: AUROC {best['objective']:.3f}"
        )
    if default is not None:
        print(f"default (mask 0.5, depth 2): AUROC {default['objective']:.3f} after {default['steps']} steps")
    if ratio is not None:
        print(f"best / default, both at step {at}: {ratio:.2f}")
    sp = info.spearman
    if sp is not None:
        print(f"Spearman(RankMe, AUROC) across {sp['trials']} trials at step {sp['step']}: {sp['rho']:+.2f}")
    report = {
        "name": "tune",
        "hardware": hardware(),
        "config": {
            "subjects": subjects,
            "steps": steps,
            "eval_every": args.eval_every,
            "grace_period": args.grace,
            "mask_ratios": list(masks),
            "predictor_depths": list(depths),
            "objective": "probe_auroc (cardiomegaly)",
            "setup_s": setup_s,
        },
        "results": {
            "trials": rows,
            "sweep_s": sweep_s,
            "steps_run": ran,
            "steps_without_early_stopping": full,
            "compute_fraction": ran / full,
            "best": best,
            "default": default,
            "spearman_rankme_auroc": info.spearman,
        },
        "best_over_default": ratio,
        "best_over_default_at_step": at,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        keep = args.out.parent / "tune"
        keep.mkdir(exist_ok=True)
        for fname in ("results.csv", "results.md", "heatmap.png"):
            shutil.copy(Path(info.url) / fname, keep / fname)
    return 0


if __name__ == "__main__":
    sys.exit(main())
