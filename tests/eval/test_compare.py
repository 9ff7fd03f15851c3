"""Paired comparisons of two encoders' probe scores on the same samples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import r2_score, roc_auc_score

from jepa_ray.eval.compare import align, paired_difference, verdict
from jepa_ray.eval.probes import two_classes


def test_a_real_difference_is_beyond_noise_and_a_tie_is_not():
    rng = np.random.default_rng(0)
    y = rng.normal(size=400)
    good = y + 0.5 * rng.normal(size=400)  # R² ~ 0.8
    bad = y + 1.5 * rng.normal(size=400)  # R² ~ -1.2
    d = paired_difference(r2_score, y, good, bad, bootstrap=300, seed=0)
    assert d["difference"] == pytest.approx(r2_score(y, good) - r2_score(y, bad))
    assert d["beyond_noise"] and d["ci95"][0] > 0 and verdict(d) == "better"
    assert verdict(paired_difference(r2_score, y, bad, good, 300, 0)) == "worse"
    # two encoders that differ only by noise of the same size: the interval straddles zero
    twin = y + 0.5 * rng.normal(size=400)
    tie = paired_difference(r2_score, y, good, twin, bootstrap=300, seed=0)
    assert not tie["beyond_noise"] and tie["ci95"][0] < 0 < tie["ci95"][1] and verdict(tie) == "within noise"


def test_pairing_sees_a_small_consistent_gain_that_separate_intervals_miss():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    base = y + rng.normal(size=300) * 1.2
    better = base + 0.25 * y  # the same errors, a slightly better separation on every sample
    d = paired_difference(roc_auc_score, y, better, base, 300, 0, valid=two_classes)
    assert d["beyond_noise"] and 0 < d["difference"] < 0.1


def test_several_studies_per_subject_are_resampled_by_subject():
    """Three studies of one subject share its error: drawn one by one they look like three
    independent samples and the interval is too narrow; drawn by subject it has the right width."""
    from jepa_ray.eval.compare import r2_weighted
    from jepa_ray.eval.probes import bootstrap_indices

    rng = np.random.default_rng(2)
    subjects = 150
    groups = np.repeat([f"s{i:03d}" for i in rng.permutation(subjects)], 3)  # labels in any order
    y = np.repeat(rng.normal(size=subjects), 3)
    a = y + np.repeat(rng.normal(size=subjects), 3) * 0.8  # the subject's error, in each of its studies
    b = y + np.repeat(rng.normal(size=subjects), 3) * 0.8
    # every resample is whole subjects: as many subjects as there are, each with all three studies
    for idx in bootstrap_indices(len(y), 20, 0, groups=groups):
        _, counts = np.unique(groups[idx], return_counts=True)
        assert len(idx) % 3 == 0 and np.all(counts % 3 == 0) and counts.sum() == 3 * subjects
        assert np.all(groups[idx].reshape(-1, 3) == groups[idx].reshape(-1, 3)[:, :1])
    # the weighted R² is the R² of the resample it stands for
    draws = bootstrap_indices(len(y), 5, 1, groups=groups)
    w = np.stack([np.bincount(d, minlength=len(y)) for d in draws])
    assert r2_weighted(y, a, w) == pytest.approx([r2_score(y[d], a[d]) for d in draws])

    # by subject the interval of a paired difference is about sqrt(3) wider than by study: the
    # three studies carry one error
    def width(draws) -> float:
        w = np.stack([np.bincount(d, minlength=len(y)) for d in draws])
        lo, hi = np.percentile(r2_weighted(y, a, w) - r2_weighted(y, b, w), [2.5, 97.5])
        return hi - lo

    by_study = width(bootstrap_indices(len(y), 400, 0))
    assert 1.4 < width(bootstrap_indices(len(y), 400, 0, groups=groups)) / by_study < 2.2
    with pytest.raises(ValueError, match="one label per item"):
        bootstrap_indices(len(y), 5, 0, groups=groups[:-1])


def test_bad_input_and_no_bootstrap():
    with pytest.raises(ValueError, match="one per sample"):
        paired_difference(r2_score, np.zeros(3), np.zeros(3), np.zeros(2), 10, 0)
    d = paired_difference(r2_score, np.arange(5.0), np.arange(5.0), np.zeros(5), 0, 0)
    assert d["ci95"] is None and d["beyond_noise"] is None and verdict(d) == "no interval"


def test_align_puts_the_other_encoders_samples_in_order():
    a = np.array(["k1", "k2", "k3"])
    b = np.array(["k3", "k1", "k2"])
    assert b[align(a, b)].tolist() == a.tolist()
    with pytest.raises(ValueError, match="different samples"):
        align(a, np.array(["k1", "k2", "k4"]))


def _tables(rng, n_subjects: int = 120, d: int = 16):
    """Two encoders over the same subjects in four splits: `pretrained` carries factor 0 in its
    pooled embedding and tokens, `random_init` only noise; the other encoder's rows come back
    shuffled, as an embedding job may return them."""
    from jepa_ray.eval.samples import Split

    subjects = [f"s{i:03d}" for i in range(n_subjects)]
    z = {s: rng.normal(size=2) for s in subjects}
    a, b, c = (int(n_subjects * f) for f in (0.5, 0.625, 0.8))
    parts = {
        "train": subjects[:a],
        "val": subjects[a:b],
        "test": subjects[b:c],
        "external": subjects[c:],
    }
    direction = rng.normal(size=d)

    def split(names, carries: bool, order) -> Split:
        f = np.array([z[s][0] for s in names])
        pooled = rng.normal(size=(len(names), d)) + (np.outer(f, direction) if carries else 0.0)
        tokens = np.repeat(pooled[:, None, :], 4, axis=1) + 0.1 * rng.normal(size=(len(names), 4, d))
        cols = {
            "has_image": np.ones(len(names), bool),
            "emb_image": pooled.astype(np.float32),
            "img_tokens": tokens.reshape(len(names), 4 * d).astype(np.float32),
            "key": np.array([f"{s}/study" for s in names], dtype=object),
        }
        return Split({k: v[order] for k, v in cols.items()}, [{"subject": names[i]} for i in order], 0)

    tables = {"pretrained": {}, "random_init": {}}
    for name, names in parts.items():
        tables["pretrained"][name] = split(names, True, np.arange(len(names)))
        tables["random_init"][name] = split(names, False, rng.permutation(len(names)))
    return tables, z


def test_the_out_of_fold_read_out_scores_every_subject_once_and_sees_a_planted_difference():
    from jepa_ray.config import load_config
    from jepa_ray.eval.evaluate import _latent_oof

    rng = np.random.default_rng(5)
    tables, z = _tables(rng)
    cfg = load_config(overrides=["eval.attentive=false", "eval.bootstrap=200"])
    r2, paired = _latent_oof(tables, ("carried", "absent"), z, ["test", "external"], cfg)
    # every subject of train, val, test and external, once
    assert r2["pretrained"]["n"] == r2["random_init"]["n"] == 120
    assert r2["pretrained"]["splits"] == ["train", "val", "test", "external"]
    assert r2["pretrained"]["linear"]["carried"] > 0.8 and r2["random_init"]["linear"]["carried"] < 0.1
    carried = paired["random_init"]["latent R² carried"]["linear"]
    assert carried["n"] == 120 and carried["beyond_noise"] and carried["difference"] > 0.7
    # a factor neither encoder carries: no difference beyond noise
    assert not paired["random_init"]["latent R² absent"]["linear"]["beyond_noise"]
    # too few subjects for the folds: nothing rather than a misleading number
    small, zs = _tables(rng, n_subjects=8)
    assert _latent_oof(small, ("carried", "absent"), zs, ["test", "external"], cfg) == ({}, {})


def test_the_batched_r2_bootstrap_gives_the_per_resample_loop_s_numbers():
    """R² differences are scored over every resample at once (sklearn's r2_score per resample, as
    other metrics still are, costs seconds per call in a bootstrap of 200); same draws, same numbers."""
    from jepa_ray.eval.compare import r2_rows

    rng = np.random.default_rng(3)
    y = rng.standard_normal(150)
    a, b = y + rng.standard_normal(150), 0.5 * y + rng.standard_normal(150)
    fast = paired_difference(r2_score, y, a, b, bootstrap=200, seed=4)
    loop = paired_difference(lambda t, p: r2_score(t, p), y, a, b, bootstrap=200, seed=4)
    assert fast["ci95"] == pytest.approx(loop["ci95"], abs=1e-12) and fast["difference"] == loop["difference"]
    # sklearn's convention on a constant target: 1.0 when predicted exactly, else 0.0
    rows = r2_rows(np.array([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0]]), np.array([[2.0, 2.0, 2.0], [1.0, 2.0, 4.0]]))
    assert rows.tolist() == [1.0, r2_score([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])]
    assert r2_rows(np.full((1, 3), 2.0), np.array([[2.0, 2.0, 2.5]])).tolist() == [0.0]
