"""Paired comparisons of two encoders' probe scores on the same samples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import r2_score, roc_auc_score

from jepa_ray.eval.compare import align, paired_difference, verdict


def _two_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


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
    d = paired_difference(roc_auc_score, y, better, base, 300, 0, valid=_two_classes)
    assert d["beyond_noise"] and 0 < d["difference"] < 0.1


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
