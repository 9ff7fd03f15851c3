"""A Ray Tune sweep of mask ratio x predictor depth on the synthetic cohort: what ASHA saves, which
setting wins, and which label-free objective (rankme, lidar, lidar_context, val_loss) agrees with a
labelled one.

System: `jepa_ray.tune.sweep` on a local Ray (all CPUs), trials of one Ray Train worker (ZeRO-2,
tiny model, 32 px), objective = out-of-fold logistic-probe AUROC of cardiomegaly on the validation
split, measured every --eval-every steps; ASHA (grace --grace steps, reduction factor 2).
Baselines: the grid point of the default config (mask ratio 0.5, predictor depth 2), measured in
the same sweep; best / default compares both at the last step the default trial reached (ASHA may
stop it early, and the objective moves with training). Compute: steps run vs every trial run to
the end. Every report also measures each label-free objective (tune.measure_all); the output
gives each one's Spearman correlation with the probe AUROC across trials at every step all trials
reached. --no-asha runs every trial to the end, so that they compare at every step, and then
checks each trial's last checkpoint on every validation sample against a steadier labelled
reference (the probe averaged over two labels and five fold splits). --from DIR recomputes that
analysis for a finished sweep into the FILE.json of the run that made it.

    python benchmarks/bench_tune.py [--quick] [--no-asha] [--out FILE.json] [--from SWEEP_DIR]

Writes the sweep's results table and heat map into a folder named after FILE.json (results/tune/).
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

os.environ.setdefault("JEPA_RAY_SALT", "benchmark-salt-not-secret-0123456789abcdef")
MASK_RATIOS = (0.3, 0.5, 0.7, 0.85)
DEPTHS = (1, 2, 4)
DEFAULT = (0.5, 2)


def trial_metrics(sweep_dir: Path) -> dict[str, list[dict[str, float]]]:
    """trial -> every report it logged (its run's metrics.csv), in step order."""
    import csv

    out = {}
    for f in sorted((sweep_dir / "trials").glob("*/metrics/metrics.csv")):
        with f.open() as fh:
            rows = [
                {k: float(v) if v not in ("", None) else None for k, v in r.items()}
                for r in csv.DictReader(fh)
            ]
        out[f.parent.parent.name] = sorted(rows, key=lambda r: r["step"])
    return out


def agreement(metrics: dict[str, list[dict[str, float]]], early: int) -> dict:
    """Spearman correlation across trials of each label-free score with the probe (`objective`), at
    every step all trials reached, and from step `early` (ASHA's first rung) to the last common
    step; the probe's agreement with itself (a ceiling for any score); its spread against its SE.

    Scores: every lf_* objective (fixed masks), and the trial's own validation loss (its own masks,
    negated) and first-batch RankMe as baselines."""
    import numpy as np
    from scipy.stats import spearmanr

    at = {t: {int(r["step"]): r for r in rs} for t, rs in metrics.items()}
    common = sorted(set.intersection(*(set(a) for a in at.values())))
    keys = sorted(
        {k for rs in metrics.values() for r in rs for k in r if k.startswith("lf_") and not k.endswith("_se")}
    )
    sign = {"val_loss": -1.0}
    scores = [*keys, "val_loss", "val_rankme"]

    def rho(xs: list, ys: list) -> float | None:
        ok = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
        if len(ok) < 3 or len({x for x, _ in ok}) < 2 or len({y for _, y in ok}) < 2:
            return None
        return round(float(spearmanr([x for x, _ in ok], [y for _, y in ok]).statistic), 3)

    def col(key: str, step: int) -> list:
        return [None if at[t][step].get(key) is None else sign.get(key, 1.0) * at[t][step][key] for t in at]

    last = common[-1]

    def name(key: str) -> str:  # lf_x: x; the trial's own metrics: trial_<key>
        return key.removeprefix("lf_") if key.startswith("lf_") else f"trial_{key}"

    by_step = {name(k): {str(s): rho(col(k, s), col("objective", s)) for s in common} for k in scores}
    for per in by_step.values():
        vals = [v for v in per.values() if v is not None]
        per["mean"] = round(float(np.mean(vals)), 3) if vals else None
    first = early if early in common else common[0]
    ahead = {name(k): rho(col(k, first), col("objective", last)) for k in scores}
    probe = [at[t][last]["objective"] for t in at]
    ses = [at[t][last].get("objective_se") for t in at]
    return {
        "steps": common,
        "spearman_by_step": by_step,
        f"spearman_step{first}_vs_probe_step{last}": ahead,
        "probe_vs_itself": {
            f"step{s}_vs_step{last}": rho(col("objective", s), col("objective", last)) for s in common[:-1]
        },
        "probe_spread_vs_se": {
            "std_across_trials": float(np.std(probe, ddof=1)),
            "mean_se": float(np.mean([x for x in ses if x is not None])) if any(ses) else None,
        },
        "history": {
            t: [{k: r.get(k) for k in ("step", "objective", "objective_se", "val_loss", *keys)} for r in rs]
            for t, rs in metrics.items()
        },
    }


def final_check(
    sweep_dir: Path, labels: tuple[str, ...] = ("cardiomegaly", "abnormal_lung"), seeds: int = 5
) -> dict:
    """At each trial's last checkpoint, on every validation sample: a steadier labelled reference
    (out-of-fold probe AUROC averaged over `labels` and `seeds` fold splits) and every label-free
    objective (plus alpha-ReQ: -|alpha - 1|, alpha the power-law decay of the embeddings'
    eigenspectrum); each one's Spearman correlation with that reference across trials, and the
    sweep's own probe's (one label, one split, 128 samples)."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from jepa_ray.config import Config
    from jepa_ray.model.io import load_jepa
    from jepa_ray.stream.local import raw_batch, read_samples
    from jepa_ray.stream.pipeline import collate, open_split
    from jepa_ray.stream.transform import transform_batch
    from jepa_ray.train.export import export, find_checkpoint
    from jepa_ray.tune.objective import LABEL_FREE, batch_outcomes, measure, probe_auroc

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    batches, out = None, {}
    with tempfile.TemporaryDirectory(prefix="bench-tune-final-") as tmp:
        for row in summary["trials"]:
            ckpt = find_checkpoint(sweep_dir / "trials" / row["trial"])
            cfg = Config.model_validate(json.loads((ckpt / "state.json").read_text())["config"])
            if batches is None:  # the validation split, unmasked crops (train=False), batches of 16
                split = open_split(str(cfg.train.shards), "val")
                samples = {k: v for p in split.paths for k, v in read_samples(p).items()}
                keys = sorted(samples)
                batches = [
                    collate(transform_batch(raw_batch({k: samples[k] for k in keys[i : i + 16]}), split.spec, cfg.pipeline, train=False, epoch=0))
                    for i in range(0, len(keys), 16)
                ]  # fmt: skip
                metas = batch_outcomes(batches)
            weights, _ = export(ckpt, Path(tmp) / row["trial"])
            model = load_jepa(weights)
            m = measure(
                model, batches, "rankme", None, candidates=LABEL_FREE, mask=summary["objective"]["mask"]
            )
            x = torch.cat([model.encode(b, "both")["pooled"] for b in batches]).numpy()
            aucs = []
            for label in labels:
                y = np.array([float((mt.get("labels") or {}).get(label, np.nan)) for mt in metas])
                ok = ~np.isnan(y)
                aucs += [probe_auroc(x[ok], y[ok], seed=s) for s in range(seeds)]
            ev = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
            ev = ev[ev > ev[0] * 1e-6]
            alpha = -np.polyfit(np.log(np.arange(1, len(ev) + 1)), np.log(ev), 1)[0]
            out[row["trial"]] = {
                "reference": float(np.mean(aucs)),
                "sweep_probe": row["objective"],
                **{n: m[f"lf_{n}"] for n in LABEL_FREE},
                "alpha": float(alpha),
                "alpha_req": -abs(float(alpha) - 1.0),
            }
    ref = [v["reference"] for v in out.values()]
    names = ["sweep_probe", *LABEL_FREE, "alpha_req"]
    return {
        "samples": len(metas),
        "labels": list(labels),
        "seeds": seeds,
        "spearman_with_reference": {
            n: round(float(spearmanr([v[n] for v in out.values()], ref).statistic), 3) for n in names
        },
        "trials": out,
    }


def print_agreement(a: dict) -> None:
    steps = a["steps"]
    print(
        "Spearman(score, probe AUROC) across trials, by step (trial_*: with the trial's own masks, first batch):"
    )
    print("  " + f"{'score':<16}" + "".join(f"{s:>7}" for s in steps) + f"{'mean':>7}")
    for n, per in a["spearman_by_step"].items():
        cells = "".join(f"{per[str(s)]:>+7.2f}" if per[str(s)] is not None else f"{'-':>7}" for s in steps)
        mean = per["mean"]
        print(f"  {n:<16}{cells}" + (f"{mean:>+7.2f}" if mean is not None else ""))
    key = next(k for k in a if k.startswith("spearman_step"))
    print(f"{key}: " + ", ".join(f"{n} {v:+.2f}" for n, v in a[key].items() if v is not None))
    print(
        "probe vs itself at the last step: "
        + ", ".join(f"{k} {v:+.2f}" for k, v in a["probe_vs_itself"].items() if v is not None)
    )
    sp = a["probe_spread_vs_se"]
    print(
        f"probe at the last step: spread across trials {sp['std_across_trials']:.3f} (sd), mean SE {sp['mean_se']:.3f}"
    )


def print_final(f: dict) -> None:
    print(
        f"At the last checkpoint, on all {f['samples']} validation samples, against the probe AUROC "
        f"averaged over {', '.join(f['labels'])} x {f['seeds']} fold splits:"
    )
    print("  " + ", ".join(f"{n} {v:+.2f}" for n, v in f["spearman_with_reference"].items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 x 2 grid, 200 subjects, 60 steps")
    ap.add_argument("--subjects", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--grace", type=int, default=30)
    ap.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches of 16 measured")
    ap.add_argument(
        "--from",
        dest="from_sweep",
        type=Path,
        default=None,
        help="only (re)compute the agreement of the objectives of a finished sweep DIR into --out",
    )
    ap.add_argument("--skip-final", action="store_true", help="with --from: no last-checkpoint check")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    subjects = args.subjects or (200 if args.quick else 400)
    steps = args.steps or (60 if args.quick else 150)
    masks, depths = ((0.3, 0.5), (1, 2)) if args.quick else (MASK_RATIOS, DEPTHS)
    if args.from_sweep is not None:  # the report of the run that made the sweep gains the analysis
        a = agreement(trial_metrics(args.from_sweep), args.grace)
        print_agreement(a)
        report = json.loads(args.out.read_text())
        skip = args.skip_final or report["config"].get("asha", True)
        final = None if skip else final_check(args.from_sweep)
        if final is not None:
            print_final(final)
        report["results"].pop("spearman_label_free_auroc_by_step", None)  # what `agreement` now holds
        report["results"]["agreement"] = a
        report["results"]["final_check"] = final
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0

    import ray

    from jepa_ray.config import SynthConfig, load_config
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.synth.cohort import cohort_inputs, write_cohort
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
        Path(__file__).resolve().parents[1] / "jepa_ray" / "configs" / "tune-demo.yaml",
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
            f"tune.eval_batches={args.eval_batches}",
            f"tune.asha.grace_period={args.grace}",
            f"tune.asha.enabled={not args.no_asha}",
            "tune.measure_all=true",
        ],
    )
    from jepa_ray.stream.pipeline import open_split

    val_samples = open_split(str(shards), "val").samples
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    t = time.perf_counter()
    info = sweep(cfg, name=name)
    sweep_s = time.perf_counter() - t
    ray.shutdown()
    agree = agreement(trial_metrics(Path(info.url)), args.grace)
    final = final_check(Path(info.url)) if args.no_asha else None  # ASHA leaves no common last checkpoint

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
    gap = info.gap
    if gap is not None and gap["se"] is not None:
        print(
            f"best beyond noise: {'yes' if gap['beyond_noise'] else 'no'} "
            f"(gap {gap['gap']:.3f} to the runner-up, 2 SE {2 * gap['se']:.3f})"
        )
    print_agreement(agree)
    if final is not None:
        print_final(final)
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
            "asha": not args.no_asha,
            "eval_batches": args.eval_batches,
            "val_samples": val_samples,
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
            "best_vs_runner_up": info.gap,
            "agreement": agree,
            "final_check": final,
        },
        "best_over_default": ratio,
        "best_over_default_at_step": at,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        keep = args.out.parent / args.out.stem  # results/tune/ for results/tune.json
        keep.mkdir(exist_ok=True)
        for fname in ("results.csv", "results.md", "heatmap.png"):
            shutil.copy(Path(info.url) / fname, keep / fname)
    return 0


if __name__ == "__main__":
    sys.exit(main())
