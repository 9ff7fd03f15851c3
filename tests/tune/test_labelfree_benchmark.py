"""The analysis of benchmarks/bench_labelfree.py: Spearman of each label-free objective with the
ground-truth reference across settings, per seed and over the seeds' means, and the reference's
own agreement between seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_labelfree as bench

FACTORS = ("cardiac", "lung", "frailty", "mass")


def _rows(quality: dict[int, list[float]], objective, seeds=(0, 1)) -> list[dict]:
    rows = []
    for seed in seeds:
        for i, q in enumerate(quality[seed]):
            rows.append(
                {
                    "setting": {
                        "mask_ratio": 0.3 + 0.1 * (i % 4),
                        "predictor_depth": None,
                        "lr": 10.0 ** -(3 + i // 4),
                    },
                    "seed": seed,
                    "attentive": dict.fromkeys(FACTORS, q),
                    "linear": dict.fromkeys(FACTORS, -q),
                    "knn": dict.fromkeys(FACTORS, q**2),
                    "scores": {n: {"value": objective(n, q, i), "se": 0.0} for n in bench.OBJECTIVES},
                    "loss_last10": -q,
                }
            )
    return rows


def test_an_objective_that_follows_the_reference_scores_one_and_one_that_reverses_it_minus_one():
    rng = np.random.default_rng(0)
    quality = {0: list(rng.random(12)), 1: list(rng.random(12))}

    def objective(name, q, i):
        return {"val_loss": q, "rankme": -q, "lidar": 5.0, "lidar_context": float(i)}[name]

    out = bench.analyse(_rows(quality, objective), [0, 1])
    att = out["spearman"]["attentive"]
    assert att["val_loss"]["per_seed"] == pytest.approx([1.0, 1.0])
    assert att["rankme"]["per_seed"] == pytest.approx([-1.0, -1.0])
    assert att["train_loss"]["per_seed"] == pytest.approx([1.0, 1.0])  # -loss_last10 = quality
    assert np.isnan(att["lidar"]["per_seed"][0])  # a constant objective ranks nothing
    # the linear reference is the negated quality here: the signs flip
    assert out["spearman"]["linear"]["val_loss"]["per_seed"] == pytest.approx([-1.0, -1.0])
    # the kNN reference is a monotone map of the quality: the same ranking
    assert out["spearman"]["knn"]["val_loss"]["per_seed"] == pytest.approx([1.0, 1.0])
    # two independent random qualities: the reference's own agreement between seeds is what they share
    from scipy.stats import spearmanr

    assert out["reference_between_seeds"]["attentive"] == pytest.approx(
        [spearmanr(quality[0], quality[1])[0]]
    )
    assert len(out["settings"]) == 12


def test_the_seeds_mean_ranking_averages_each_setting_over_seeds():
    # seed 0 and seed 1 cancel: every setting's mean quality over the seeds is the same
    quality = {0: [float(i) for i in range(12)], 1: [float(11 - i) for i in range(12)]}

    def objective(name, q, i):
        return float(i)

    out = bench.analyse(_rows(quality, objective), [0, 1])
    v = out["spearman"]["attentive"]["val_loss"]
    assert v["per_seed"] == pytest.approx([1.0, -1.0])
    assert np.isnan(v["seed_mean"])  # a flat reference of the means: nothing to rank
    assert out["reference_between_seeds"]["attentive"] == pytest.approx([-1.0])
