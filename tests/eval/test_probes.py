"""Probe, retrieval and bootstrap arithmetic on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from jepa_ray.eval import probes


def test_recall_at_k_counts_the_true_partner_rank_and_prints_chance():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((50, 16))
    exact = probes.recall_at(gallery + 0.01 * rng.standard_normal((50, 16)), gallery, [1, 5])
    assert exact["recall@1"] == 1.0 and exact["chance@1"] == pytest.approx(1 / 50)
    shuffled = probes.recall_at(gallery[rng.permutation(50)], gallery, [1, 5, 10])
    assert shuffled["recall@1"] < 0.1 and shuffled["chance@10"] == pytest.approx(10 / 50)
    # the common component every query shares is removed before the cosine
    offset = probes.recall_at(gallery + 100.0, gallery, [1])
    assert offset["recall@1"] == 1.0


def test_the_rank_auroc_is_sklearns_value_ties_included():
    rng = np.random.default_rng(7)
    for n in (2, 5, 40, 333):
        y = np.r_[True, False, rng.random(n - 2) < 0.3]
        for score in (rng.standard_normal(n), rng.integers(0, 3, n).astype(float), np.zeros(n)):
            assert probes.auroc_score(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert probes.auroc_score(np.array([0, 1, 1]), np.array([0.1, 0.5, 0.2])) == 1.0
    assert probes.auroc_score(np.array([1, 0, 0]), np.array([0.1, 0.5, 0.2])) == 0.0


def test_auroc_with_bootstrap_interval_around_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    score = y + rng.standard_normal(200)
    r = probes.auroc(y, score, bootstrap=200, seed=0)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, score))
    lo, hi = r["ci95"]
    assert lo < r["auroc"] < hi and hi - lo < 0.25 and r["positives"] == int(y.sum())
    one_class = probes.auroc(np.zeros(10, bool), np.arange(10.0), 100, 0)
    assert one_class["auroc"] is None and one_class["note"] == "one class only"


def test_logistic_and_knn_probes_find_a_linear_label():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 8))
    y = (x[:, 0] + 0.3 * rng.standard_normal(400) > 0).astype(int)
    score = probes.logistic_probe(x[:300], y[:300])
    assert roc_auc_score(y[300:], score(x[300:])) > 0.95
    knn = probes.knn_scores(x[:300], y[:300], x[300:], k=10)
    assert roc_auc_score(y[300:], knn) > 0.8 and knn.min() >= 0 and knn.max() <= 1
    noise = probes.logistic_probe(x[:300], rng.integers(0, 2, 300))
    assert abs(roc_auc_score(y[300:], noise(x[300:])) - 0.5) < 0.15


def test_latent_r2_is_high_for_linear_factors_and_near_zero_for_noise():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((500, 3))
    x = np.concatenate([z @ rng.standard_normal((3, 20)), rng.standard_normal((500, 20))], axis=1)
    x[:, :20] += 0.1 * rng.standard_normal((500, 20))
    res = probes.latent_r2(x[:400], z[:400], {"test": (x[400:], z[400:])})
    assert min(res["test"]["r2"]) > 0.9 and res["test"]["n"] == 100
    noise = rng.standard_normal((500, 40))
    res = probes.latent_r2(noise[:400], z[:400], {"test": (noise[400:], z[400:])})
    assert max(res["test"]["r2"]) < 0.05
    # each factor's alpha is its own: a factor's R² is the same fit alone or beside a noisy one
    # (which wants far stronger shrinkage), as the paired comparisons of `evaluate` fit it
    mixed = np.stack([z[:, 0], rng.standard_normal(500)], 1)
    res = probes.latent_r2(x[:400], mixed[:400], {"test": (x[400:], mixed[400:])})["test"]
    alone = probes.latent_r2(x[:400], mixed[:400, :1], {"test": (x[400:], mixed[400:, :1])})["test"]
    assert res["r2"][0] == pytest.approx(alone["r2"][0]) and res["alpha"][0] == alone["alpha"][0]
    assert res["alpha"][1] > res["alpha"][0]


def test_the_linear_map_read_out_retrieves_what_x_carries_of_y_and_nothing_else():
    rng = np.random.default_rng(3)
    x = {"train": rng.standard_normal((200, 8)), "test": rng.standard_normal((60, 8))}
    w = rng.standard_normal((8, 12))
    y = {k: v @ w + 0.05 * rng.standard_normal((len(v), 12)) for k, v in x.items()}
    y["train"][rng.random(y["train"].shape) < 0.05] = np.nan  # missing raw features
    carried = probes.linear_map_recall(x, y, "train", ["test"], [1, 5])["test"]
    assert carried["n"] == 60 and carried["recall@1"] > 0.9 and carried["chance@5"] == 5 / 60
    unrelated = {k: rng.standard_normal((len(v), 12)) for k, v in x.items()}
    none = probes.linear_map_recall(x, unrelated, "train", ["test"], [5])["test"]
    assert none["recall@5"] < 3 * none["chance@5"]
    few = probes.linear_map_recall({k: v[:6] for k, v in x.items()}, y, "train", ["test"], [5])["test"]
    assert "note" in few and "6 train samples" in few["note"]


def test_the_linear_map_read_out_reduces_a_wide_token_grid_to_its_principal_components():
    # 16 region tokens x 40 values = 640 inputs from 200 training rows: the map goes through the
    # fit split's top principal components, which hold the 8 factors y follows
    rng = np.random.default_rng(4)
    z = {"train": rng.standard_normal((200, 8)), "test": rng.standard_normal((60, 8))}
    mix, w = rng.standard_normal((8, 640)), rng.standard_normal((8, 12))
    x = {k: v @ mix + 0.3 * rng.standard_normal((len(v), 640)) for k, v in z.items()}
    y = {k: v @ w + 0.05 * rng.standard_normal((len(v), 12)) for k, v in z.items()}
    wide = probes.linear_map_recall(x, y, "train", ["test"], [1])["test"]
    assert wide["recall@1"] > 0.9
    # fewer components than factors lose what y needs: the reduction is real
    narrow = probes.linear_map_recall(x, y, "train", ["test"], [1], max_dims=2)["test"]
    assert narrow["recall@1"] < wide["recall@1"] - 0.3


def _spread(rng, n: int, width: int, scales) -> tuple[np.ndarray, np.ndarray]:
    """(x, u): len(scales) factors u mixed into every one of `width` features (+-scale each) under
    unit noise: the first spread thinly, as bone density over the ribs and spine."""
    u = rng.standard_normal((n, len(scales)))
    return (u * scales) @ rng.choice([-1.0, 1.0], (len(scales), width)) + rng.standard_normal((n, width)), u


def test_the_capped_oof_ridge_reads_a_signal_spread_over_10k_features():
    # 200 subjects (two studies each) x 10,000 features, a token grid's width at ViT-B is 12k-150k
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(5)
    x, u = _spread(rng, 200, 10_000, [0.1, 0.3, 0.3])
    groups = np.arange(200) // 2  # no subject on both sides of a fold
    pred = probes.oof_latent(x, u[:, :1], groups, max_dims=probes.GRID_DIMS)
    assert pred.shape == (200, 1) and r2_score(u[:, 0], pred[:, 0]) > 0.6
    noise = probes.oof_latent(rng.standard_normal((200, 10_000)), u[:, :1], groups, max_dims=probes.GRID_DIMS)
    assert r2_score(u[:, 0], noise[:, 0]) < 0.05


def test_the_capped_oof_ridge_fits_its_components_on_each_training_fold_only(monkeypatch):
    from sklearn.decomposition import PCA
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(6)
    x, u = _spread(rng, 150, 2_000, [1.0, 1.0, 1.0])
    groups = np.arange(150) // 3
    fits: list[np.ndarray] = []
    fit_transform = PCA.fit_transform

    def spy(self, a, y=None):
        fits.append(np.asarray(a).copy())
        return fit_transform(self, a, y)

    monkeypatch.setattr(PCA, "fit_transform", spy)
    pred = probes.oof_latent(x, u, groups, max_dims=16)  # 2,000 features, 120 training rows: reduced
    assert min(r2_score(u[:, j], pred[:, j]) for j in range(3)) > 0.8  # 3 factors fit in 16 components
    # one PCA per fold, on exactly that fold's training rows (standardised on them): none held out
    folds = list(GroupKFold(5).split(x, u, groups))
    assert len(fits) == 5
    for (train, _), a in zip(folds, fits, strict=True):
        assert a.shape == (len(train), 2_000) == (120, 2_000)
        np.testing.assert_allclose(a, (x[train] - x[train].mean(0)) / x[train].std(0), atol=1e-6)
    # under the cap, and when the fold's rows are fewer than the cap: the plain ridge, no PCA
    fits.clear()
    probes.oof_latent(x[:, :500], u, groups, max_dims=probes.GRID_DIMS)
    probes.oof_latent(x, u, groups, max_dims=probes.GRID_DIMS)
    assert fits == []


def test_components_spanning_the_fold_give_the_full_ridge_and_fewer_lose_a_faint_factor():
    # why a fold of at most max_dims + 1 rows skips the PCA: not whitened, components spanning the
    # training rows leave the ridge (and its alpha choice) as it was, a ridge being rotation-invariant
    from sklearn.decomposition import PCA
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(7)
    x, u = _spread(rng, 120, 600, [0.1, 0.5, 0.5, 0.5])
    ridge = [StandardScaler(), RidgeCV(alphas=probes.FINE_ALPHA_GRID, alpha_per_target=True)]
    full = make_pipeline(*ridge).fit(x[:96], u[:96, :1])
    ridge = [StandardScaler(), RidgeCV(alphas=probes.FINE_ALPHA_GRID, alpha_per_target=True)]
    spanning = make_pipeline(ridge[0], PCA(95), ridge[1]).fit(x[:96], u[:96, :1])
    np.testing.assert_allclose(spanning.predict(x[96:]), full.predict(x[96:]), rtol=1e-5, atol=1e-8)
    assert spanning[-1].alpha_ == full[-1].alpha_
    # 2 components hold the loud factors, not the faint one: the reduction is real
    groups = np.arange(120)
    wide = probes.oof_latent(x, u[:, :1], groups)
    narrow = probes.oof_latent(x, u[:, :1], groups, max_dims=2)
    assert r2_score(u[:, 0], wide[:, 0]) > 0.5 > r2_score(u[:, 0], narrow[:, 0]) + 0.3
