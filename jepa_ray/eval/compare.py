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
    rng = np.random.default_rng(seed)
    diffs, tries = [], 0
    while len(diffs) < bootstrap and tries < 2 * bootstrap:
        tries += 1
        idx = rng.integers(0, len(y), len(y))
        if valid is None or valid(y[idx]):
            diffs.append(metric(y[idx], score_a[idx]) - metric(y[idx], score_b[idx]))
    if not diffs:
        return out | {"ci95": None, "beyond_noise": None}
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return out | {"ci95": [float(lo), float(hi)], "beyond_noise": bool(lo > 0 or hi < 0)}


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
    """One phrase for a difference: 'better', 'worse' (beyond noise) or 'within noise'."""
    if not d.get("beyond_noise"):
        return "within noise"
    return "better" if d["difference"] > 0 else "worse"
