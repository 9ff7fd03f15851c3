"""Is one encoder better than another beyond noise? Paired bootstrap differences of probe metrics.

Two encoders are scored on the *same* held-out samples, so their metrics are compared pairwise:
each bootstrap resample draws one set of samples and scores both encoders' predictions on it,
and the 95% interval of the difference says whether it is beyond what the choice of samples
explains (`beyond_noise`: the interval excludes zero). Two separate intervals that overlap say
much less: most of their width is the sample draw both encoders share.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import r2_score

from jepa_ray.eval.probes import bootstrap_indices, two_classes

Metric = Callable[[np.ndarray, np.ndarray], float]


def paired_difference(
    metric: Metric,
    y: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    bootstrap: int,
    seed: int,
    valid: Callable[[np.ndarray], bool] | None = None,
) -> dict:
    """metric(y, score_a) - metric(y, score_b) and its paired bootstrap 95% interval.

    `valid(y_resampled)` rejects resamples the metric is undefined on (one class only for AUROC).
    Returns {"a", "b", "difference", "ci95", "beyond_noise", "n"}; ci95 None when bootstrap is 0.
    """
    y, score_a, score_b = np.asarray(y), np.asarray(score_a), np.asarray(score_b)
    if not len(y) == len(score_a) == len(score_b):
        raise ValueError(f"paired scores need one per sample: {len(y)}, {len(score_a)}, {len(score_b)}")
    a, b = metric(y, score_a), metric(y, score_b)
    out = {"a": float(a), "b": float(b), "difference": float(a - b), "n": len(y)}
    if bootstrap == 0:
        return out | {"ci95": None, "beyond_noise": None}
    keep = None if valid is None else (lambda idx: valid(y[idx]))
    draws = bootstrap_indices(len(y), bootstrap, seed, keep)
    if metric is r2_score and y.ndim == 1:  # every resample at once, in blocks of ~2M values
        block = max(1, 2_000_000 // len(y))
        diffs = []
        for i in range(0, len(draws), block):
            idx = np.stack(draws[i : i + block])
            diffs.extend(r2_rows(y[idx], score_a[idx]) - r2_rows(y[idx], score_b[idx]))
    else:
        diffs = [metric(y[idx], score_a[idx]) - metric(y[idx], score_b[idx]) for idx in draws]
    if not diffs:
        return out | {"ci95": None, "beyond_noise": None}
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return out | {"ci95": [float(lo), float(hi)], "beyond_noise": bool(lo > 0 or hi < 0)}


def r2_rows(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """R² of each row of (B, n) predictions against its row of targets: sklearn's r2_score per row
    (a constant target row scores 1.0 when predicted exactly, else 0.0), without its per-call
    checks that dominate a bootstrap of thousands of small resamples."""
    ss_res = ((y - pred) ** 2).sum(1)
    ss_tot = ((y - y.mean(1, keepdims=True)) ** 2).sum(1)
    constant = ss_tot == 0
    out = 1.0 - ss_res / np.where(constant, 1.0, ss_tot)
    return np.where(constant, np.where(ss_res == 0, 1.0, 0.0), out)


def r2_weighted(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """R² of `pred` against `y` (n,) on each row of sample counts `w` (B, n): r2_rows of the
    resamples the counts stand for, without building them (resamples of whole subjects differ in
    length, so they do not stack)."""
    total = w.sum(1)
    mean = (w * y).sum(1) / total
    ss_res = (w * (y - pred) ** 2).sum(1)
    ss_tot = (w * (y[None] - mean[:, None]) ** 2).sum(1)
    constant = ss_tot <= 1e-12 * np.maximum(1.0, (w * y**2).sum(1))
    out = 1.0 - ss_res / np.where(constant, 1.0, ss_tot)
    return np.where(constant, np.where(ss_res == 0, 1.0, 0.0), out)


def align(keys_a: np.ndarray, keys_b: np.ndarray) -> np.ndarray:
    """Indices into b that put b's samples in a's order (the same samples embedded by two encoders
    may come back in another order); ValueError when the two sets of samples differ."""
    where = {k: i for i, k in enumerate(keys_b)}
    missing = [k for k in keys_a if k not in where]
    if missing or len(keys_a) != len(keys_b):
        raise ValueError(
            f"the two encoders were scored on different samples ({len(missing)} of {len(keys_a)} unmatched)"
        )
    return np.array([where[k] for k in keys_a], dtype=np.intp)


def verdict(d: dict) -> str:
    """One phrase for a difference: 'better', 'worse' (beyond noise), 'within noise', or 'no
    interval' (bootstrap off)."""
    if d.get("beyond_noise") is None:
        return "no interval"
    if not d["beyond_noise"]:
        return "within noise"
    return "better" if d["difference"] > 0 else "worse"


def _fit(readout: str, task: str, x_fit: np.ndarray, y_fit: np.ndarray, settings):
    """A probe fit on (x_fit, y_fit) as a function of x: linear (ridge / logistic on pooled
    embeddings) or attentive (on image tokens)."""
    from jepa_ray.eval import attentive, probes

    if readout == "attentive":
        return attentive.fit_attentive(x_fit, y_fit, task=task, settings=settings).predict
    return probes.linear_probe(task, x_fit, y_fit)


def compare_encoders(
    tables: dict,
    reference: str,
    tasks: dict[str, tuple[str, Callable]],
    fit_split: str,
    reports: list[str],
    readouts: tuple[str, ...],
    bootstrap: int,
    seed: int,
    settings=None,
    fitted: dict | None = None,
) -> dict:
    """The reference encoder against every other one, on the image input, for each task, read-out
    and reported split: {other: {task: {readout: {split: paired_difference dict}}}}.

    tables: encoder name -> {split name -> `evaluate.Split`}; tasks: name -> (kind, target) with
    kind "regression" or "binary" and target(split) -> (rows (n,) bool, values (rows.sum(),)).
    Both encoders' probes are fit on the same fit samples and scored on the same report samples
    (each split's samples matched by key). `fitted`: probes already fit that way, (name, task,
    readout) -> predict(x), used instead of fitting them again.
    """
    from jepa_ray.eval.probes import auroc_score

    probes: dict = dict(fitted or {})

    def probe(name: str, task: str, readout: str):
        if (name, task, readout) not in probes:
            kind, target = tasks[task]
            fit = tables[name][fit_split]
            rows, y = target(fit)
            ok = len(y) >= 4 and (kind != "binary" or two_classes(y))
            probes[name, task, readout] = (
                _fit(readout, kind, _view(fit, readout)[rows], y, settings) if ok else None
            )
        return probes[name, task, readout]

    out: dict = {}
    for other in tables:
        if other == reference:
            continue
        out[other] = {}
        for task, (kind, target) in tasks.items():
            metric = auroc_score if kind == "binary" else r2_score
            valid = two_classes if kind == "binary" else None
            res: dict = {}
            for readout in readouts:
                pa, pb = probe(reference, task, readout), probe(other, task, readout)
                if pa is None or pb is None:
                    continue
                res[readout] = {}
                for split in reports:
                    a, b = tables[reference][split], tables[other][split]
                    order = align(np.asarray(a.cols["key"]), np.asarray(b.cols["key"]))
                    rows, y = target(a)
                    if len(y) < 2 or (kind == "binary" and not two_classes(y)):
                        continue
                    xa, xb = _view(a, readout)[rows], _view(b, readout)[order][rows]
                    res[readout][split] = paired_difference(metric, y, pa(xa), pb(xb), bootstrap, seed, valid)
            out[other][task] = res
    return out


def _view(split, readout: str) -> np.ndarray:
    """The probe's input for a read-out: pooled image embeddings (N, D) or image tokens (N, T, D)."""
    return split.image_tokens() if readout == "attentive" else split.cols["emb_image"]
