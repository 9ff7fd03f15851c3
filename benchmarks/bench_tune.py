"""The label-free objective through `jepa-ray tune` itself: does a Ray Tune sweep, ranked without
labels, rank its trials the way the ground truth does? And what ASHA saves, which setting wins.

System: `jepa_ray.tune.sweep` on a local Ray (all CPUs) with the shipped tune-demo.yaml (trials of
one Ray Train worker, ZeRO-2, tiny model, 32 px), on the learning benchmark's cohort (1,600
subjects, `bench_learning.cohort`; --workdir reuses one), over mask ratio (0.3 / 0.5 / 0.7 / 0.85)
x learning rate (`--grid lr`, the axes tune-demo.yaml ships; 3e-4 / 1e-3 / 3e-3) or x predictor
depth (`--grid depth`: 1 / 2 / 4), --steps of batch --batch per trial (default 300 x 32, as
`bench_labelfree.py` trains each setting in one process). Ranked by what `jepa-ray tune` picks for
the grid (val_loss, lidar_context for a predictor sweep) or by --objective (probe_auroc: the
cardiomegaly probe on 128 validation samples); every report also measures each label-free
objective (tune.measure_all). ASHA (grace --grace steps, reduction factor 2) unless --no-asha.

Reference, with --no-asha (every trial run to the end): at each trial's last checkpoint, the
ground-truth factors read from the training split's images by the learning benchmark's read-outs
(the attentive probe averaged over --probe-seeds fits, the linear and grid ridges) and a labelled
probe AUROC on every validation sample (two labels x five fold splits); reported: Spearman across
trials of the sweep's own ranking, of every label-free objective as the sweep measured it and on
every validation sample, with each reference. Baselines: the default grid point (mask ratio 0.5,
the config's value of the other axis), measured in the same sweep; compute: steps run against
every trial run to the end. With a labelled --objective, each label-free objective's agreement
with it at every report. The attentive reference's own reliability across trials (its single probe
fits against one another) and what a score ranking as the noise-free reference would reach against
it. --from DIR recomputes the
analysis for a finished sweep into the FILE.json of the run that made it (with --skip-final, from
the last-checkpoint reads that FILE.json already holds; with --candidates, also ranks more
label-free measures read from each trial's last checkpoint: `candidate_scores`).

    python benchmarks/bench_tune.py [--grid lr|depth] [--objective NAME] [--no-asha] [--seed S]
        [--quick] [--workdir DIR] [--out FILE.json] [--from SWEEP_DIR [--skip-final] [--candidates]]

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
import bench_learning as bl  # sets the benchmarks' salt
from bench_labelfree import GRIDS, MASK_RATIOS
from bench_prepare import hardware


def rho(xs: list, ys: list) -> float | None:
    """Spearman correlation over the pairs where both are known; None with fewer than 3 such pairs
    or either side constant."""
    from scipy.stats import spearmanr

    ok = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    if len(ok) < 3 or len({x for x, _ in ok}) < 2 or len({y for _, y in ok}) < 2:
        return None
    return round(float(spearmanr([x for x, _ in ok], [y for _, y in ok]).statistic), 3)


REFERENCES = ("attentive", "grid", "linear")


def against_references(trials: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """{reference: {score: Spearman across trials}} for `final_check`'s rows: every score (the
    sweep's own, each label-free objective as the sweep measured it and on every validation sample,
    alpha-ReQ) against the ground truth's read-outs and the labelled AUROC. The sweep's score of a
    trial it ranked last for collapse (None) counts as the lowest, as `jepa-ray tune` ranks it."""
    rows = list(trials.values())
    refs = {
        **{r: [v["reference"][r] for v in rows] for r in REFERENCES},
        "labelled_auroc": [v["labelled_auroc"] for v in rows],
    }
    lf = sorted({k.removeprefix("sweep_lf_") for v in rows for k in v if k.startswith("sweep_lf_")})
    cand = sorted({k for v in rows for k in v if k.startswith("cand_")})
    names = ["sweep", *(f"sweep_lf_{n}" for n in lf), *lf, "alpha_req", *cand]

    def col(name: str) -> list:
        if name == "sweep":
            return [float("-inf") if v["sweep"] is None else v["sweep"] for v in rows]
        return [v.get(name) for v in rows]

    return {ref: {n: rho(col(n), vals) for n in names} for ref, vals in refs.items()}


def token_spreads(z, valid):
    """(B,) numpy: each sample's spread of its layer-normed latents z (B, T, D) around their own
    mean (mean squared deviation per dimension) over its `valid` (B, T) tokens; 0 when every token
    of a sample is the same vector, about 1 for unrelated ones; nan for a sample with fewer than 2.
    How much a sample's patch latents differ from one another: what an attentive read-out has
    beyond the pooled embedding."""
    import torch

    w = valid.unsqueeze(-1).to(z.dtype)
    n = w.sum(1)  # (B, 1)
    mean = (z * w).sum(1) / n.clamp(min=1)
    dev = ((z - mean.unsqueeze(1)).square().mean(-1, keepdim=True) * w).sum(1) / n.clamp(min=1)
    return torch.where(n >= 2, dev, torch.nan).squeeze(-1).numpy()


def candidate_scores(model, batches: list[dict], mask: dict | None) -> dict[str, float]:
    """Label-free measures tried as sweep objectives beside `jepa_ray.tune.labelfree`'s, on one
    checkpoint's validation batches (higher is better): `target_spread` (`token_spreads` of the
    target encoder's patch latents, the JEPA's targets, over the samples with an image),
    `prediction` (the prediction loss alone on the reference masks, negated: val_loss without
    SIGReg), `explained_spread` (target_spread minus that loss: the within-image target variance the
    predictor accounts for, both in the targets' per-dimension units) and `pixel_pcs` (out-of-fold
    ridge R², `cv_latent_r2` with one sample per fold group, of the top 8 principal components of
    the validation images' pixels from the pooled image embedding, over the samples with an image:
    how much of the images' main variation the encoder keeps)."""
    import numpy as np
    import torch

    from jepa_ray.config import MaskConfig
    from jepa_ray.eval.probes import cv_latent_r2
    from jepa_ray.model.jepa import image_slots
    from jepa_ray.tune.labelfree import reference_masks

    ref = MaskConfig.model_validate(mask or {})
    model.eval()
    spreads, losses, counts, pooled, pixels = [], [], [], [], []
    with torch.no_grad():
        for batch in batches:
            b = reference_masks(batch, model.dims.grids, ref, 0)
            z_img, z_ehr = model.targets(b)
            out = model.student(b, z_img, z_ehr)
            losses.append(float(out.get("prediction_loss", out["loss"])))
            counts.append(float(out["targets"]))
            spreads.append(token_spreads(z_img.float(), image_slots(b, model.dims)))
            has = batch["has_image"].bool()
            pooled.append(model.encode(batch, "image")["pooled"][has].float().numpy())
            pixels.append(batch["image"][has].float().flatten(1).numpy())
    spread = float(np.nanmean(np.concatenate(spreads)))  # over the samples with an image
    loss = float(np.average(losses, weights=counts))
    x, pix = np.concatenate(pooled), np.concatenate(pixels)
    u, sv, _ = np.linalg.svd(pix - pix.mean(0), full_matrices=False)
    return {
        "target_spread": spread,
        "prediction": -loss,
        "explained_spread": spread - loss,
        "pixel_pcs": float(np.mean(cv_latent_r2(x, u[:, :8] * sv[:8], groups=list(range(len(x)))))),
    }


def add_candidates(sweep_dir: Path, trials: dict[str, dict]) -> None:
    """In place: `cand_<name>` of `candidate_scores` for each trial row of a finished sweep, at its
    last checkpoint, on every validation sample (batches of 16, as `final_check` reads them)."""
    from jepa_ray.config import Config
    from jepa_ray.model.io import load_jepa
    from jepa_ray.train.export import export, find_checkpoint

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    batches = None
    with tempfile.TemporaryDirectory(prefix="bench-tune-candidates-") as tmp:
        for trial, row in trials.items():
            ckpt = find_checkpoint(sweep_dir / "trials" / trial)
            if batches is None:
                cfg = Config.model_validate(json.loads((ckpt / "state.json").read_text())["config"])
                spec, samples = bl.load_split(Path(str(cfg.train.shards)), "val", cfg.pipeline)
                batches = bl.batches_of(samples, sorted(samples), spec, cfg.pipeline, size=16)
            weights, _ = export(ckpt, Path(tmp) / trial)
            scores = candidate_scores(load_jepa(weights), batches, summary["objective"]["mask"])
            row.update({f"cand_{k}": v for k, v in scores.items()})
            print(f"  {trial} {row['setting']}: " + ", ".join(f"{k} {v:+.4f}" for k, v in scores.items()))


def reference_reliability(trials: dict[str, dict]) -> dict | None:
    """How far the attentive reference can be trusted to rank the trials, from its single probe fits
    (`attentive_per_probe_seed`, each one's R² averaged over the factors): the mean Spearman across
    trials between two fits (r), the Spearman-Brown reliability of their mean (k fits: k r / (1 +
    (k - 1) r)) and its square root, the correlation a score that ranks as the noise-free reference
    does would have with the fits' mean (the reference's noise ceiling: a score above it agrees with
    the fits' noise too). None with fewer than 2 fits."""
    from itertools import combinations

    import numpy as np

    rows = list(trials.values())
    fits = [v["readouts"].get("attentive_per_probe_seed") or [] for v in rows]
    k = min(len(f) for f in fits) if fits else 0
    if k < 2:
        return None
    per_fit = [[float(np.mean(list(f[i].values()))) for f in fits] for i in range(k)]
    pairs = [rho(a, b) for a, b in combinations(per_fit, 2)]
    if any(r is None for r in pairs):
        return None
    r = float(np.mean(pairs))
    reliability = k * r / (1 + (k - 1) * r) if r > 0 else 0.0
    return {
        "fits": k,
        "fit_vs_fit": [round(x, 3) for x in pairs],
        "mean_fit_vs_fit": round(r, 3),
        "reliability": round(reliability, 3),
        "ceiling": round(float(np.sqrt(reliability)), 3),
    }


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

    at = {t: {int(r["step"]): r for r in rs} for t, rs in metrics.items()}
    common = sorted(set.intersection(*(set(a) for a in at.values())))
    keys = sorted(
        {k for rs in metrics.values() for r in rs for k in r if k.startswith("lf_") and not k.endswith("_se")}
    )
    sign = {"val_loss": -1.0}
    scores = [*keys, "val_loss", "val_rankme"]

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
    sweep_dir: Path,
    work: Path,
    probe_seeds: int = 1,
    labels: tuple[str, ...] = ("cardiomegaly", "abnormal_lung"),
    seeds: int = 5,
) -> dict:
    """At each trial's last checkpoint: the ground truth's reference (the learning benchmark's
    read-outs of the cohort's 4 latent factors over the training split's images, `bench_labelfree`'s:
    the attentive probe averaged over `probe_seeds` fits, the linear and grid ridges), a labelled one
    (out-of-fold probe AUROC on every validation sample, averaged over `labels` and `seeds` fold
    splits), every label-free objective on every validation sample (plus alpha-ReQ: -|alpha - 1|,
    alpha the power-law decay of the embeddings' eigenspectrum) and the sweep's own score of the
    trial at its last report (`sweep`: what `jepa-ray tune` ranked it by; `sweep_lf_<name>`: each
    label-free objective as the sweep measured it, tune.measure_all). Each score's Spearman
    correlation with each reference across trials."""
    import numpy as np
    import torch
    from bench_labelfree import probe_set

    from jepa_ray.config import Config
    from jepa_ray.model.io import load_jepa
    from jepa_ray.train.export import export, find_checkpoint
    from jepa_ray.tune.objective import LABEL_FREE, batch_outcomes, measure, probe_auroc

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    reports = trial_metrics(sweep_dir)
    batches, probe, out = None, None, {}
    with tempfile.TemporaryDirectory(prefix="bench-tune-final-") as tmp:
        for row in summary["trials"]:
            ckpt = find_checkpoint(sweep_dir / "trials" / row["trial"])
            cfg = Config.model_validate(json.loads((ckpt / "state.json").read_text())["config"])
            if batches is None:  # the validation split, unmasked crops (train=False), batches of 16
                spec, samples = bl.load_split(Path(str(cfg.train.shards)), "val", cfg.pipeline)
                batches = bl.batches_of(samples, sorted(samples), spec, cfg.pipeline, size=16)
                metas = batch_outcomes(batches)
                _, _, probe, z, groups = probe_set(work, Path(str(cfg.train.shards)), cfg.pipeline)
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
                if ok.sum() >= 10 and len(set(y[ok])) == 2:
                    aucs += [probe_auroc(x[ok], y[ok], seed=s) for s in range(seeds)]
            ev = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
            ev = ev[ev > ev[0] * 1e-6]
            alpha = -np.polyfit(np.log(np.arange(1, len(ev) + 1)), np.log(ev), 1)[0]
            pooled, tokens = bl.image_views(model, probe)
            read = bl.readouts(pooled, tokens, z, groups, seed=cfg.pipeline.seed, probe_seeds=probe_seeds)
            last = reports[row["trial"]][-1] if reports.get(row["trial"]) else {}
            out[row["trial"]] = {
                "setting": {k: row[k] for k in summary["space"]},
                "steps": row["steps"],
                "reference": {r: float(np.mean(list(read[r].values()))) for r in REFERENCES},
                "readouts": read,
                "labelled_auroc": float(np.mean(aucs)) if aucs else None,
                "sweep": row["objective"],
                **{f"sweep_lf_{n}": last.get(f"lf_{n}") for n in LABEL_FREE},
                **{n: m[f"lf_{n}"] for n in LABEL_FREE},
                "alpha": float(alpha),
                "alpha_req": -abs(float(alpha) - 1.0),
            }
            print(
                f"  {row['trial']} {out[row['trial']]['setting']}: attentive R² "
                + " ".join(f"{v:+.3f}" for v in read["attentive"].values())
                + f", sweep's score {row['objective']}",
                flush=True,
            )
    return {
        "samples": len(metas),
        "labels": list(labels),
        "seeds": seeds,
        "probe_seeds": probe_seeds,
        "objective": summary["objective"].get("kind"),
        "spearman": against_references(out),
        "attentive_reliability": reference_reliability(out),
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
        f"At each trial's last checkpoint: Spearman across trials of each score (sweep: what the sweep "
        f"ranked by, {f['objective']}; sweep_lf_*: as the sweep measured them; the rest on all "
        f"{f['samples']} validation samples) with each reference:"
    )
    for ref, per in f["spearman"].items():
        print(f"  {ref:<15}" + ", ".join(f"{n} {v:+.2f}" for n, v in per.items() if v is not None))
    rel = f.get("attentive_reliability")
    if rel is not None:
        print(
            f"the attentive reference's single fits agree across trials at {rel['mean_fit_vs_fit']:+.2f} "
            f"(Spearman, mean of pairs); the mean of {rel['fits']} has reliability {rel['reliability']:.2f}: "
            f"a score ranking as the noise-free reference does would agree with it at ~{rel['ceiling']:+.2f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 x 2 grid, 200 subjects, 60 steps")
    ap.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default="lr",
        help="the axis beside the mask ratio: the learning rate (the shipped tune-demo.yaml's) or the "
        "predictor's depth",
    )
    ap.add_argument(
        "--objective",
        default=None,
        help="what ranks the trials (tune.objective); default: what `jepa-ray tune` picks for the grid "
        "(val_loss; lidar_context for the depth grid). probe_auroc: ranked by the cardiomegaly probe",
    )
    ap.add_argument(
        "--subjects", type=int, default=None, help="default 1,600 (the learning benchmark's cohort)"
    )
    ap.add_argument("--steps", type=int, default=None, help="default 300 (bench_labelfree's)")
    ap.add_argument("--batch", type=int, default=32, help="per trial (bench_labelfree's)")
    ap.add_argument("--eval-every", type=int, default=None, help="default steps / 5")
    ap.add_argument("--grace", type=int, default=None, help="ASHA's first rung; default 2 reports")
    ap.add_argument("--no-asha", action="store_true", help="run every trial to the end, then check each")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches of 16 measured")
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="pipeline.seed of every trial: its initialisation, data order, masks",
    )
    ap.add_argument(
        "--probe-seeds", type=int, default=3, help="fits of the attentive probe averaged into the reference"
    )
    ap.add_argument(
        "--from",
        dest="from_sweep",
        type=Path,
        default=None,
        help="only (re)compute the analysis of a finished sweep DIR into --out (needs its --workdir)",
    )
    ap.add_argument(
        "--skip-final",
        action="store_true",
        help="with --from: read no checkpoint; re-analyse the reads the --out JSON holds, if any",
    )
    ap.add_argument(
        "--candidates",
        action="store_true",
        help="with --from: also score candidate_scores' label-free measures on each trial's last "
        "checkpoint (no probe is refitted) and rank them against the references the --out JSON holds",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="reuse the learning benchmark's cohort")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    subjects = args.subjects or (200 if args.quick else 1600)
    steps = args.steps or (60 if args.quick else 300)
    every = args.eval_every or max(steps // 5, 1)
    grace = args.grace or 2 * every
    axis, values = GRIDS[args.grid]
    key = {"lr": "train.lr", "predictor_depth": "model.predictor_depth"}[axis]
    masks, values = ((0.3, 0.7), values[::2]) if args.quick else (MASK_RATIOS, values)
    labelled = args.objective in ("probe_auroc", "cindex")
    if args.from_sweep is not None:  # the report of the run that made the sweep gains the analysis
        if args.out is None or not args.out.exists():
            ap.error("--from needs --out: the JSON of the run that made the sweep")
        report = json.loads(args.out.read_text())
        skip = args.skip_final or report["config"].get("asha", True)  # ASHA leaves no common last step
        if not skip and args.workdir is None:
            ap.error("--from without --skip-final needs --workdir: the cohort the reference reads")
        kind = json.loads((args.from_sweep / "sweep.json").read_text())["objective"]["kind"]
        # the sweep's own objective, not --objective: agreement with a labelled one only
        a = agreement(trial_metrics(args.from_sweep), grace) if kind in ("probe_auroc", "cindex") else None
        if a is not None:
            print_agreement(a)
        final = None if skip else final_check(args.from_sweep, args.workdir, args.probe_seeds)
        final = final or report["results"].get("final_check")  # else the checkpoints' reads already made
        if final is not None:
            if args.candidates:
                add_candidates(args.from_sweep, final["trials"])
            final = {
                **final,
                "spearman": against_references(final["trials"]),
                "attentive_reliability": reference_reliability(final["trials"]),
            }
        if final is not None:
            print_final(final)
        report["results"]["agreement"] = a
        report["results"]["final_check"] = final
        args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
        return 0

    import ray

    from jepa_ray.config import load_config
    from jepa_ray.stream.pipeline import open_split
    from jepa_ray.tune.sweep import sweep

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    t0 = time.perf_counter()
    shards = bl.cohort(work, subjects)
    setup_s = time.perf_counter() - t0
    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING"
    )
    space = f"tune.space={{pipeline.mask.mask_ratio: {{values: {list(masks)}}}, {key}: {{values: {list(values)}}}}}"
    objective = (
        [f"tune.objective={args.objective}"]
        + (["tune.label=cardiomegaly"] if args.objective == "probe_auroc" else [])
        if args.objective
        else []
    )
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "jepa_ray" / "configs" / "tune-demo.yaml",
        overrides=[
            f"train.shards={shards}",
            f"train.storage_path={work / 'sweeps'}",
            f"train.steps={steps}",
            f"train.warmup_steps={max(steps // 10, 1)}",
            f"train.checkpoint_every={steps}",
            f"pipeline.batch_size={args.batch}",
            f"pipeline.seed={args.seed}",
            space,
            *objective,
            f"tune.eval_every={every}",
            f"tune.eval_batches={args.eval_batches}",
            f"tune.asha.grace_period={grace}",
            f"tune.asha.enabled={not args.no_asha}",
            "tune.measure_all=true",
        ],
    )
    val_samples = open_split(str(shards), "val").samples
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    t = time.perf_counter()
    info = sweep(cfg, name=name)
    sweep_s = time.perf_counter() - t
    ray.shutdown()
    kind = json.loads((Path(info.url) / "sweep.json").read_text())["objective"]["kind"]
    agree = agreement(trial_metrics(Path(info.url)), grace) if labelled else None
    t = time.perf_counter()  # ASHA leaves no common last checkpoint to check
    final = final_check(Path(info.url), work, args.probe_seeds) if args.no_asha else None
    check_s = time.perf_counter() - t

    rows = info.rows
    base = {"pipeline.mask.mask_ratio": 0.5, key: getattr(cfg.train if axis == "lr" else cfg.model, axis)}
    default = next((r for r in rows if all(r[k] == v for k, v in base.items())), None)
    ran = sum(r["steps"] for r in rows)
    full = len(rows) * steps
    best = info.best
    ratio, at = None, None
    if best is not None and default is not None and labelled:
        at = default["steps"]

        def value_at(trial: str) -> float | None:
            seen = [o for s, o, _ in info.history[trial] if s <= at and o is not None]
            return seen[-1] if seen else None

        b, d = value_at(best["trial"]), value_at(default["trial"])
        ratio = b / d if b is not None and d else None
    print(f"{len(rows)} trials in {sweep_s:.0f} s, ranked by {kind}; setup (cohort) {setup_s:.0f} s")
    print(f"steps run / steps without early stopping: {ran} / {full} = {ran / full:.2f}")
    print(f"stopped early by ASHA: {sum(r['stopped_early'] for r in rows)} of {len(rows)}")
    if best is not None:
        print(f"best: {', '.join(f'{k} {best[k]}' for k in base)}: {kind} {best['objective']:.4f}")
    if default is not None and default["objective"] is not None:
        print(
            f"default ({', '.join(f'{k} {v}' for k, v in base.items())}): {kind} {default['objective']:.4f} after {default['steps']} steps"
        )
    if ratio is not None:
        print(f"best / default, both at step {at}: {ratio:.2f}")
    gap = info.gap
    if gap is not None and gap["se"] is not None:
        print(
            f"best beyond noise: {'yes' if gap['beyond_noise'] else 'no'} "
            f"(gap {gap['gap']:.4f} to the runner-up, 2 SE {2 * gap['se']:.4f})"
        )
    if agree is not None:
        print_agreement(agree)
    if final is not None:
        print_final(final)
    report = {
        "name": "tune",
        "hardware": hardware(),
        "config": {
            "subjects": subjects,
            "steps": steps,
            "batch": args.batch,
            "eval_every": every,
            "grace_period": grace,
            "mask_ratios": list(masks),
            key: list(values),
            "objective": kind + (" (cardiomegaly)" if kind == "probe_auroc" else ""),
            "asha": not args.no_asha,
            "eval_batches": args.eval_batches,
            "seed": args.seed,
            "probe_seeds": args.probe_seeds,
            "val_samples": val_samples,
            "setup_s": setup_s,
        },
        "results": {
            "trials": rows,
            "sweep_s": sweep_s,
            "final_check_s": check_s,
            "steps_run": ran,
            "steps_without_early_stopping": full,
            "compute_fraction": ran / full,
            "best": best,
            "default": default,
            "spearman_rankme_objective": info.spearman,
            "best_vs_runner_up": info.gap,
            "agreement": agree,
            "final_check": final,
        },
        "best_over_default": ratio,
        "best_over_default_at_step": at,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
        keep = args.out.parent / args.out.stem  # results/tune/ for results/tune.json
        keep.mkdir(exist_ok=True)
        for fname in ("results.csv", "results.md", "heatmap.png"):
            shutil.copy(Path(info.url) / fname, keep / fname)
    return 0


if __name__ == "__main__":
    sys.exit(main())
