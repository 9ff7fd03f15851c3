"""Probes on frozen embeddings: logistic regression and kNN (AUROC with bootstrap 95% CIs), the
ground-truth check (R² of latent factors from a ridge on pooled image embeddings) and cross-modal
retrieval (recall@k beside its chance level).

Everything is fit on the fit split only, regularisation chosen by cross-validation inside it; the
reported splits are never seen before scoring.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strength of the logistic probe
ALPHA_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # ridge strength of the latent probe
FINE_ALPHA_GRID = tuple(np.logspace(-2, 4, 13))  # the same, finer: for the cross-validated probe
MAP_DIMS = 128  # principal components a wider input of the retrieval map is reduced to
# features the grid read-out (image tokens in grid order) keeps: wider inputs (16 x 768 at ViT-B) go
# through their leading principal components, fit inside each training fold
GRID_DIMS = 4096


def bootstrap_indices(size: int, n: int, seed: int, valid=None, groups=None) -> list[np.ndarray]:
    """Up to n bootstrap resamples of `size` items, as index arrays; those where `valid(idx)` is
    False (e.g. one class only) are redrawn, at most n times.

    `groups` (one label per item, e.g. each study's subject) makes it a cluster bootstrap: the
    groups are drawn with replacement, each bringing all its items. Studies of one subject are not
    independent samples; drawing them one by one would make an interval too narrow."""
    rng = np.random.default_rng(seed)
    members = None if groups is None else _members(groups, size)
    out: list[np.ndarray] = []
    tries = 0
    while len(out) < n and tries < 2 * n:
        tries += 1
        if members is None:
            idx = rng.integers(0, size, size)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if valid is None or valid(idx):
            out.append(idx)
    return out


def _members(groups, size: int) -> list[np.ndarray]:
    """The item indices of each distinct group label."""
    groups = np.asarray(groups)
    if len(groups) != size:
        raise ValueError(f"groups: one label per item needed, got {len(groups)} for {size} items")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def bootstrap_ci(metric, arrays: tuple[np.ndarray, ...], n: int, seed: int, valid=None) -> list[float] | None:
    """Percentile 95% interval of metric(*resampled arrays) over n resamples (`bootstrap_indices`;
    `valid(*resampled arrays)` says which to keep); None if n == 0."""
    if n == 0:
        return None
    keep = None if valid is None else (lambda idx: valid(*(a[idx] for a in arrays)))
    values = [metric(*(a[idx] for a in arrays)) for idx in bootstrap_indices(len(arrays[0]), n, seed, keep)]
    if not values:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def auroc_score(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic over average ranks (tied scores count one half): the
    value of sklearn's roc_auc_score without its input checks, so ~15x faster on the small
    samples a bootstrap scores thousands of times. y must hold both classes."""
    y = np.asarray(y, dtype=bool)
    pos = int(y.sum())
    neg = len(y) - pos
    return float((rankdata(score)[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def two_classes(y: np.ndarray, _score: np.ndarray | None = None) -> bool:
    """Whether binary labels hold both classes (an AUROC is defined); the unused second argument lets
    it serve as a bootstrap's validity check on (y, score)."""
    return 0 < int(np.sum(y)) < len(y)


def auroc(y: np.ndarray, score: np.ndarray, bootstrap: int, seed: int) -> dict:
    """AUROC with its bootstrap CI and counts; None where a split holds one class only."""
    y = y.astype(bool)
    out = {"n": len(y), "positives": int(y.sum())}
    if not two_classes(y):
        return out | {"auroc": None, "ci95": None, "note": "one class only"}
    return out | {
        "auroc": auroc_score(y, score),
        "ci95": bootstrap_ci(auroc_score, (y, score), bootstrap, seed, two_classes),
    }


def _auroc_scorer(estimator, x: np.ndarray, y: np.ndarray) -> float:
    """The cross-validation's scorer: `auroc_score` of the estimator's decision function (sklearn's
    "roc_auc" scorer gives the same values, its input checks costing half a probe's fit time on
    small samples); NaN on a fold that holds one class."""
    return auroc_score(y, estimator.decision_function(x)) if two_classes(np.asarray(y)) else float("nan")


def logistic_probe(x_fit: np.ndarray, y_fit: np.ndarray):
    """Standardised L2 logistic regression, C chosen by stratified k-fold AUROC on the fit split
    (k = 5, fewer when a class has fewer samples). Returns score(x) -> (n,)."""
    folds = min(5, int(y_fit.sum()), int(len(y_fit) - y_fit.sum()))
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=C_GRID,
            l1_ratios=(0.0,),
            cv=folds,
            scoring=_auroc_scorer,
            max_iter=2000,
            use_legacy_attributes=False,
        )
        if folds >= 2
        else LogisticRegression(max_iter=2000),
    ).fit(x_fit, y_fit)
    return model.decision_function


def linear_probe(task: str, x_fit: np.ndarray, y_fit: np.ndarray):
    """The linear read-out of a task as a function of x: `logistic_probe` for "binary" labels, a
    standardised ridge (alpha by leave-one-out over ALPHA_GRID) for a continuous target."""
    if task == "binary":
        return logistic_probe(x_fit, y_fit)
    return make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHA_GRID)).fit(x_fit, y_fit).predict


def knn_scores(x_fit: np.ndarray, y_fit: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Fraction of positive labels among the k nearest fit samples (cosine), per row of x."""
    a = x_fit / np.linalg.norm(x_fit, axis=1, keepdims=True).clip(min=1e-12)
    b = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    k = min(k, len(a))
    nearest = np.argpartition(-(b @ a.T), k - 1, axis=1)[:, :k]
    return y_fit[nearest].mean(1)


def latent_r2(x_fit: np.ndarray, z_fit: np.ndarray, reports: dict[str, tuple]) -> dict:
    """Ridge from standardised embeddings to each latent factor (each factor's alpha by leave-one-out
    on the fit split, so that its R² does not depend on which other factors are fit beside it); R²
    per factor on each reported split: {split: {"r2": [per factor], "n", "alpha": [per factor]}}."""
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHA_GRID, alpha_per_target=True)).fit(
        x_fit, z_fit
    )
    out = {}
    for split, (x, z) in reports.items():
        pred = model.predict(x).reshape(len(x), -1)
        out[split] = {
            "r2": [float(r2_score(z[:, j], pred[:, j])) for j in range(z.shape[1])],
            "n": len(z),
            "alpha": [float(a) for a in np.atleast_1d(model[-1].alpha_)],
        }
    return out


def oof_latent(
    x: np.ndarray,
    z: np.ndarray,
    groups,
    folds: int = 5,
    alphas=FINE_ALPHA_GRID,
    max_dims: int | None = None,
) -> np.ndarray:
    """Out-of-fold predictions (N, F) of a ridge from standardised embeddings x (N, D) to z (N, F),
    folds grouped (by subject: no subject on both sides), each factor's alpha by inner CV on its
    own (a shared alpha fit to a well-carried factor overfits a faint one beside it).

    `max_dims` (GRID_DIMS for the grid read-out): an x wider than that is reduced, inside each fold
    and fit on its training rows only, to its leading max_dims principal components before the
    ridge. They are not whitened: a ridge is rotation-invariant, so components spanning the
    training rows (rows - 1 of them, the rank of the centred fold) give the ridge on every
    standardised feature, alpha choice included; a fold of at most max_dims + 1 training rows is
    therefore fit without the PCA, to the same predictions at a fraction of the cost."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GroupKFold

    x = np.asarray(x)
    z = np.asarray(z, float).reshape(len(x), -1)
    pred = np.zeros(z.shape)
    for train, held in GroupKFold(folds).split(x, z, groups):
        steps: list = [StandardScaler()]
        if max_dims is not None and x.shape[1] > max_dims and len(train) - 1 > max_dims:
            steps.append(PCA(max_dims, random_state=0))
        ridge = make_pipeline(*steps, RidgeCV(alphas=alphas, alpha_per_target=True))
        pred[held] = ridge.fit(x[train], z[train]).predict(x[held]).reshape(len(held), -1)
    return pred


def cv_latent_r2(
    x: np.ndarray, z: np.ndarray, groups: list, folds: int = 5, alphas=FINE_ALPHA_GRID
) -> list[float]:
    """Out-of-fold R² per latent factor of `oof_latent`: for a cohort small enough that a
    held-out split would be too noisy to compare two encoders."""
    pred = oof_latent(x, z, groups, folds, alphas)
    z = np.asarray(z, float).reshape(len(pred), -1)
    return [float(r2_score(z[:, j], pred[:, j])) for j in range(z.shape[1])]


def linear_map_recall(
    x: dict[str, np.ndarray], y: dict[str, np.ndarray], fit: str, report: list[str], ks: list[int],
    max_dims: int = MAP_DIMS,
) -> dict[str, dict]:  # fmt: skip
    """Per split of `report`: recall@k of retrieving row i of y[split] from row i of x[split]
    through a ridge map from x to y fit on the `fit` split (each side standardised on it, missing
    values 0, the penalty by cross-validation): the linear read-out of cross-modal retrieval, which
    asks what of y a representation x carries, whatever its own space. An x wider than `max_dims`
    (a grid of region tokens: 16 x 768 values at ViT-B width) is first reduced to its `max_dims`
    principal components on the fit split, each standardised, so that the map stays well posed and
    cheap on any encoder."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV

    if len(x[fit]) < 10:
        return {
            s: {"n": len(x.get(s, ())), "note": f"{len(x[fit])} {fit} samples with both modalities"}
            for s in report
        }

    def prep(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mu = np.nanmean(a[fit], 0)
        sd = np.nanstd(a[fit], 0) + 1e-6
        return {k: np.nan_to_num((v - np.nan_to_num(mu)) / np.nan_to_num(sd, nan=1.0)) for k, v in a.items()}

    xs, ys = prep(x), prep(y)
    if xs[fit].shape[1] > max_dims:
        dims = min(max_dims, len(xs[fit]))  # no more components than fit samples
        pca = PCA(dims, random_state=0).fit(xs[fit])
        xs = prep({k: pca.transform(v) if len(v) else v[:, :dims] for k, v in xs.items()})
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(xs[fit], ys[fit])
    return {s: recall_at(ridge.predict(xs[s]), ys[s], ks) if len(xs[s]) else {"n": 0} for s in report}


def recall_at(query: np.ndarray, gallery: np.ndarray, ks: list[int]) -> dict:
    """Recall@k of retrieving row i of `gallery` with row i of `query`, and chance k/n.

    Cosine similarity after centring each side on its own mean: predictions share a large
    position-only component (the mask tokens carry positions) that would otherwise dominate."""
    n = len(query)
    if n == 0:
        return {"n": 0, "note": "no sample with both modalities"}
    q, g = query - query.mean(0), gallery - gallery.mean(0)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(min=1e-12)
    g = g / np.linalg.norm(g, axis=1, keepdims=True).clip(min=1e-12)
    sim = q @ g.T
    rank = (sim > np.diag(sim)[:, None]).sum(1)  # how many gallery items beat the true partner
    out = {"n": int(n)}
    for k in ks:
        out[f"recall@{k}"] = float((rank < k).mean())
        out[f"chance@{k}"] = min(k / n, 1.0)
    return out
