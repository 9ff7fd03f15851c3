"""Few labels: how each encoder's frozen embeddings read when only a fraction of the fit split is
labelled, the regime self-supervised pretraining is for (I-JEPA's 1% ImageNet read-out; a
hospital's few hundred labelled outcomes beside an archive of unlabelled studies).

For each fraction in eval.label_fractions and each of eval.label_draws draws, a seeded subset of
the fit split's labelled subjects (at least MIN_LABELLED, with at least MIN_EVENTS events, or
positives and negatives) fits the same linear read-out on every encoder's pooled embeddings:
ridge Cox for the time-to-event outcome (penalty chosen by a 3-fold split of the labelled rows),
logistic for each binary label, ridge for each latent factor; on the EHR input the classical ridge
Cox on the raw EHR features is fit on the same rows beside them. Each read-out is scored on the
reported splits; an encoder's score is its mean over the draws (one draw of 10% of a few hundred
subjects moves a c-index by several hundredths). The pretrained encoder is compared with each
other one on the same draws and the same held-out samples, resampled together: the interval of
the draw-mean difference says whether it is beyond what the held-out samples explain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jepa_ray.eval.compare import align
from jepa_ray.eval.probes import bootstrap_indices
from jepa_ray.eval.samples import Split

MIN_LABELLED = 24  # the fewest labelled rows a few-label read-out fits on (8 per inner fold)
MIN_EVENTS = 6  # ... and the fewest events (or of each class) among them: a fit needs both kinds
COX_ALPHAS = (10.0, 100.0, 1000.0, 10000.0)  # ridge penalties the Cox read-out chooses among
INNER_FOLDS = 3
INPUT_COLUMNS = {"image": "emb_image", "ehr": "emb_ehr"}
RAW = "raw_ehr_cox"  # the row of the raw EHR features (time-to-event on the EHR input)
STARTS_MEAN = "random_starts_mean"  # every random start compared as one, by their mean score


def labelled_rows(drawn: np.ndarray, flag: np.ndarray, fraction: float, both: bool = False) -> np.ndarray:
    """The labelled rows of a few-label read-out, sorted: the first `fraction` of the `drawn` rows
    (at least MIN_LABELLED), and as many more as bring in MIN_EVENTS rows whose `flag` is set
    (events, positives), and with `both` as many unset too, so that rare events or a rare class
    still reach the fit (all of them when fewer exist)."""
    take = min(max(round(fraction * len(drawn)), MIN_LABELLED), len(drawn))
    for kind in (flag[drawn] > 0, flag[drawn] <= 0) if both else (flag[drawn] > 0,):
        seen = np.cumsum(kind)
        if seen.size and seen[take - 1] < MIN_EVENTS:
            take = max(take, int(np.searchsorted(seen, min(MIN_EVENTS, seen[-1]))) + 1)
    return np.sort(drawn[:take])


def inner_cindex(x, time, event, alpha, model=None, tolerant: bool = True) -> float:
    """The mean Harrell c-index of `model` (default RidgeCox) at penalty `alpha` over a 3-fold
    split of the rows (row i in fold i mod 3). With `tolerant`, a fold with no event or a failed fit
    is left out (few labelled rows); -inf when every fold is."""
    from jepa_ray.eval.survival import RidgeCox, harrell

    model = model or RidgeCox
    inner = np.arange(len(time)) % INNER_FOLDS
    scores = []
    for i in range(INNER_FOLDS):
        fit, test = inner != i, inner == i
        try:
            m = model(x[fit], time[fit], event[fit], alpha=alpha)
            scores.append(harrell(time[test], event[test], m.risk(x[test])))
        except (ValueError, ArithmeticError, np.linalg.LinAlgError):
            if not tolerant:
                raise
            scores.append(np.nan)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else -np.inf


def ridge_cox(x, time, event, alphas=COX_ALPHAS) -> Callable[[np.ndarray], np.ndarray]:
    """A ridge Cox model on (x, time, event), its penalty the best of `alphas` by `inner_cindex`;
    its risk(x)."""
    from jepa_ray.eval.survival import RidgeCox

    alpha = alphas[0] if len(alphas) == 1 else max(alphas, key=lambda a: inner_cindex(x, time, event, a))
    return RidgeCox(x, time, event, alpha=alpha).risk


def _fit(kind: str, x: np.ndarray, y) -> Callable[[np.ndarray], np.ndarray]:
    if kind == "survival":
        return ridge_cox(x, *y)
    from jepa_ray.eval.probes import linear_probe

    return linear_probe(kind, x, y)


def _metric(kind: str) -> tuple[Callable, Callable]:
    """(score(y, prediction), valid(y)) of a task kind; y of a survival task is (time, event)."""
    from sklearn.metrics import r2_score

    from jepa_ray.eval.probes import auroc_score, two_classes
    from jepa_ray.eval.survival import cindex_defined, harrell

    if kind == "survival":
        return (lambda y, r: harrell(y[0], y[1], r)), (lambda y: cindex_defined(*y))
    if kind == "binary":
        return auroc_score, two_classes
    return r2_score, lambda y: len(y) >= 2


def _take(y, idx):
    return (y[0][idx], y[1][idx]) if isinstance(y, tuple) else y[idx]


Target = Callable[[Split], tuple[np.ndarray, Any]]  # split -> (rows (n,) bool, y of those rows)


def tasks_of(splits: dict[str, Split], endpoint: str | None, labels: list[str], factors, z) -> dict:
    """The few-label tasks the data allow: {name: (kind, inputs, target)}: the endpoint's c-index
    and each label's AUROC on the image and EHR inputs, each latent factor's R² on the image."""
    tasks: dict[str, tuple[str, tuple[str, ...], Target]] = {}
    both = ("image", "ehr")
    if endpoint is not None:

        def survival(s: Split) -> tuple[np.ndarray, Any]:
            time, event = s.tte(endpoint)
            rows = ~np.isnan(time) & (time > 0)
            return rows, (time[rows], event[rows])

        tasks[f"c-index {endpoint}"] = ("survival", both, survival)
    for label in labels:

        def binary(s: Split, label=label) -> tuple[np.ndarray, Any]:
            y = s.label(label)
            rows = ~np.isnan(y)
            return rows, y[rows].astype(int)

        tasks[f"AUROC {label}"] = ("binary", both, binary)
    for j, factor in enumerate(factors if z is not None else ()):

        def latent(s: Split, j=j) -> tuple[np.ndarray, Any]:
            rows = np.array([subj in z for subj in s.subjects], dtype=bool)
            return rows, np.array([z[subj][j] for subj in s.subjects[rows]], dtype=float)

        tasks[f"R² {factor}"] = ("regression", ("image",), latent)
    return tasks


def few_label_reads(
    tables: dict[str, dict[str, Split]],
    raw: dict[str, np.ndarray] | None,
    tasks: dict,
    fit_split: str,
    reports: list[str],
    fractions: list[float],
    draws: int,
    bootstrap: int,
    seed: int,
    reference: str = "pretrained",
    groups: dict[str, list[str]] | None = None,
) -> dict:
    """Every task's few-label read-out for every encoder of `tables` (and the raw EHR features
    `raw`, in the reference's sample order, on the EHR input's time-to-event task): {"fractions",
    "draws", "min_labelled", "tasks": {task: {input: {fraction: {"labelled", "scores": {encoder:
    {split: {"mean", "draws"}}}, "versus": {other: {split: paired difference}}}}}}}, or a "note"
    where a task cannot be read. `groups`: name -> encoders compared as one, by their mean score
    (e.g. every random start: one start's read-out can sit far from a typical start's)."""
    ref = tables[reference]
    # every encoder's columns put in the reference's sample order, split by split
    orders = {
        name: {s: align(np.asarray(ref[s].cols["key"]), np.asarray(t[s].cols["key"])) for s in ref if s in t}
        for name, t in tables.items()
    }
    out: dict[str, Any] = {
        "fractions": list(fractions),
        "draws": draws,
        "min_labelled": MIN_LABELLED,
        "tasks": {},
    }
    for task, (kind, inputs, target) in tasks.items():
        score, valid = _metric(kind)
        out["tasks"][task] = {}
        for inp in inputs:
            col = INPUT_COLUMNS[inp]
            has = f"has_{inp}"

            def rows_of(s: Split, target=target, has=has) -> tuple[np.ndarray, Any]:
                ok, y = target(s)
                keep = s.cols[has].astype(bool)[ok]
                return np.flatnonzero(ok)[keep], _take(y, np.flatnonzero(keep))

            if not ref[fit_split].cols[has].any():
                continue  # data without this modality (an EHR-only table): nothing to read
            fit_rows, y_fit = rows_of(ref[fit_split])
            flag = y_fit[1] if kind == "survival" else (y_fit if kind == "binary" else np.ones(len(fit_rows)))
            if len(fit_rows) < MIN_LABELLED or (kind != "regression" and not valid(y_fit)):
                out["tasks"][task][inp] = {
                    "note": f"{len(fit_rows)} labelled subjects with the {inp} input in {fit_split}: "
                    f"too few for a few-label read-out (at least {MIN_LABELLED}, with both outcomes)"
                }
                continue
            held = {split: rows_of(ref[split]) for split in reports if split in ref}
            held = {split: (r, y) for split, (r, y) in held.items() if len(r) >= 2 and valid(y)}
            xs = {
                name: {s: tables[name][s].cols[col][orders[name][s]] for s in (fit_split, *held)}
                for name in tables
            }
            if raw is not None and kind == "survival" and inp == "ehr":
                xs[RAW] = {s: raw[s] for s in (fit_split, *held)}
            res: dict[str, Any] = {}
            for fraction in fractions:
                preds: dict[str, dict[str, list[np.ndarray]]] = {n: {s: [] for s in held} for n in xs}
                labelled = []
                try:
                    for d in range(draws):
                        rng = np.random.default_rng([seed, d, round(fraction * 10_000)])
                        pick = labelled_rows(
                            rng.permutation(len(fit_rows)), flag, fraction, both=kind == "binary"
                        )
                        labelled.append(len(pick))
                        for name, x in xs.items():
                            predict = _fit(
                                kind, x[fit_split][fit_rows[pick]].astype(float), _take(y_fit, pick)
                            )
                            for split, (r, _) in held.items():
                                preds[name][split].append(predict(x[split][r].astype(float)))
                except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:
                    # one encoder's fit failing on a draw leaves the draws unpaired: the fraction is
                    # reported as not read, the other fractions and tasks go on
                    res[str(fraction)] = {
                        "note": f"a read-out could not be fit on {labelled[-1]} labelled subjects "
                        f"({name}, draw {d + 1}): {e}"
                    }
                    continue
                scores = {
                    name: {
                        split: _summary([score(held[split][1], p) for p in ps])
                        for split, ps in by_split.items()
                    }
                    for name, by_split in preds.items()
                }
                against = {other: [other] for other in preds if other != reference}
                against |= {name: members for name, members in (groups or {}).items() if len(members) > 1}
                versus = {
                    other: {
                        split: _paired(
                            score,
                            valid,
                            held[split][1],
                            preds[reference][split],
                            [preds[m][split] for m in members],
                            bootstrap,
                            seed,
                        )
                        for split in held
                    }
                    for other, members in against.items()
                }
                res[str(fraction)] = {
                    "labelled": round(float(np.mean(labelled))),
                    "of": len(fit_rows),
                    "scores": scores,
                    "versus": versus,
                }
            out["tasks"][task][inp] = res
    return out


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "draws": [round(float(v), 4) for v in values]}


def _paired(
    score, valid, y, preds_a: list[np.ndarray], preds_b: list[list[np.ndarray]], bootstrap: int, seed: int
) -> dict:
    """The draw-mean score of a minus that of b (the mean over b's encoders, each a list of draws),
    and its paired bootstrap 95% interval over the held-out samples (each resample scores every
    draw of every encoder on the same samples)."""

    def mean_score(yy, preds: list[np.ndarray], idx=slice(None)) -> float:
        return float(np.mean([score(yy, p[idx]) for p in preds]))

    a = mean_score(y, preds_a)
    b = float(np.mean([mean_score(y, ps) for ps in preds_b]))
    n = len(y[0]) if isinstance(y, tuple) else len(y)
    out = {"a": a, "b": b, "difference": a - b, "n": n}
    if len(preds_b) > 1:
        out["of"] = len(preds_b)
    if bootstrap == 0:
        return out | {"ci95": None, "beyond_noise": None}
    diffs = []
    for idx in bootstrap_indices(n, bootstrap, seed, lambda idx: valid(_take(y, idx))):
        yy = _take(y, idx)
        diffs.append(mean_score(yy, preds_a, idx) - np.mean([mean_score(yy, ps, idx) for ps in preds_b]))
    if not diffs:
        return out | {"ci95": None, "beyond_noise": None}
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return out | {"ci95": [float(lo), float(hi)], "beyond_noise": bool(lo > 0 or hi < 0)}
