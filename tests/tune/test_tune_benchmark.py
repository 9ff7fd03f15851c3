"""The analysis of benchmarks/bench_tune.py's last-checkpoint check: Spearman across a sweep's
trials of each score with each reference, a trial the sweep ranked last for collapse counting as
its lowest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_tune as bench


def _trial(quality: float, sweep: float | None, lf: dict[str, float | None], auroc: float | None) -> dict:
    return {
        "reference": {"attentive": quality, "grid": quality / 2, "linear": -quality},
        "labelled_auroc": auroc,
        "sweep": sweep,
        **{f"sweep_lf_{n}": v for n, v in lf.items()},
        **lf,
        "alpha_req": 0.0,
    }


def test_each_score_is_ranked_against_each_reference_across_the_trials():
    qualities = [0.30, 0.35, 0.40, 0.45, 0.50]
    trials = {
        f"t{i}": _trial(
            q,
            sweep=-1.0 + q,  # the sweep's own objective follows the truth
            lf={"val_loss": -1.0 + q, "rankme": 10.0 - 10 * q, "lidar": None if i == 0 else float(i % 2)},
            auroc=0.6 + (0.1 if i == 3 else 0.0),
        )
        for i, q in enumerate(qualities)
    }
    out = bench.against_references(trials)
    assert set(out) == {"attentive", "grid", "linear", "labelled_auroc"}
    assert out["attentive"]["sweep"] == 1.0 and out["attentive"]["val_loss"] == 1.0
    assert out["attentive"]["sweep_lf_val_loss"] == 1.0
    assert out["attentive"]["rankme"] == -1.0 and out["linear"]["rankme"] == 1.0
    assert out["grid"]["sweep"] == 1.0  # a monotone transform of the truth ranks the same
    # lidar unknown for one trial: ranked over the four known (1, 0, 1, 0 against rising quality)
    assert out["attentive"]["lidar"] == pytest.approx(-0.447, abs=1e-3)
    assert out["attentive"]["alpha_req"] is None  # constant: no ranking
    assert out["labelled_auroc"]["sweep"] == pytest.approx(0.354, abs=1e-3)


def test_a_trial_ranked_last_for_collapse_is_the_sweeps_lowest_not_left_out():
    # the truth's best trial collapsed by the sweep's guard (objective None): tune ranks it last
    trials = {
        "a": _trial(0.1, sweep=-0.9, lf={"val_loss": -0.9}, auroc=None),
        "b": _trial(0.2, sweep=-0.8, lf={"val_loss": -0.8}, auroc=None),
        "c": _trial(0.3, sweep=-0.7, lf={"val_loss": -0.7}, auroc=None),
        "d": _trial(0.4, sweep=None, lf={"val_loss": -0.6}, auroc=None),
    }
    out = bench.against_references(trials)
    assert out["attentive"]["sweep"] == pytest.approx(-0.2)  # left out it would read +1.0
    assert out["attentive"]["val_loss"] == 1.0  # the objective itself, unguarded
    assert out["labelled_auroc"]["sweep"] is None  # no labelled reference at all


def _fits(trials: dict, per_fit: list[list[float]]) -> dict:
    """Give each trial attentive single fits whose mean over the factors is per_fit[k][trial]."""
    for i, v in enumerate(trials.values()):
        v["readouts"] = {"attentive_per_probe_seed": [{"a": f[i], "b": f[i]} for f in per_fit]}
    return trials


def test_the_reference_noise_ceiling_follows_how_its_single_fits_agree():
    trials = {f"t{i}": _trial(0.1 * i, sweep=None, lf={}, auroc=None) for i in range(5)}
    same = bench.reference_reliability(_fits(trials, [[1, 2, 3, 4, 5]] * 3))
    assert same["fits"] == 3 and same["mean_fit_vs_fit"] == 1.0 and same["ceiling"] == 1.0
    # two fits that agree at Spearman 0.8: the mean of two is reliable at 2 * 0.8 / 1.8 = 0.889
    half = bench.reference_reliability(_fits(trials, [[1, 2, 3, 4, 5], [2, 1, 4, 3, 5]]))
    assert half["fit_vs_fit"] == [0.8] and half["reliability"] == pytest.approx(0.889)
    assert half["ceiling"] == pytest.approx(0.943, abs=1e-3)
    # fits that disagree: nothing can rank against their mean
    against = bench.reference_reliability(_fits(trials, [[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]))
    assert against["reliability"] == 0.0 and against["ceiling"] == 0.0
    assert bench.reference_reliability(_fits(trials, [[1, 2, 3, 4, 5]])) is None  # one fit


def test_token_spread_is_zero_for_identical_tokens_and_ignores_padding():
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 64, generator=g)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True, unbiased=False)  # layer-normed
    z[0] = z[0, :1]  # sample 0: one vector six times
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 3:] = False  # sample 1: three tokens and three padding slots
    valid[2, 1:] = False  # sample 2: a single token
    before = bench.token_spreads(z, valid)
    z[1, 3:] = 1e3  # what lies in padding does not count
    after = bench.token_spreads(z, valid)
    assert after[0] == pytest.approx(0.0, abs=1e-6)
    # three unrelated unit-variance vectors around their own mean: (1 - 1/3) of their variance
    assert after[1] == pytest.approx(2 / 3, abs=0.15) and after[1] == before[1]
    assert np.isnan(after[2])


def test_candidate_measures_are_ranked_beside_the_objectives():
    trials = {
        f"t{i}": {**_trial(q, sweep=q, lf={}, auroc=None), "cand_target_spread": -q}
        for i, q in enumerate([0.1, 0.2, 0.3, 0.4])
    }
    out = bench.against_references(trials)
    assert out["attentive"]["cand_target_spread"] == -1.0 and out["linear"]["cand_target_spread"] == 1.0


def test_candidate_measures_of_a_tiny_jepa(small_shards):
    import math

    import bench_learning as bl
    import torch

    from jepa_ray.config import ModelConfig, load_config
    from jepa_ray.model.jepa import JEPA

    cfg = load_config(overrides=["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=12"])
    spec, samples = bl.load_split(small_shards, "train", cfg.pipeline)
    batches = bl.batches_of(samples, sorted(samples)[:48], spec, cfg.pipeline, size=16)
    torch.manual_seed(0)
    model = JEPA(spec.model_dims(cfg.pipeline), ModelConfig(preset="tiny", width=96, depth=3, heads=4))
    out = bench.candidate_scores(model, batches, None)
    assert set(out) == {"target_spread", "prediction", "explained_spread", "pixel_pcs"}
    assert all(math.isfinite(v) for v in out.values()), out
    assert 0 < out["target_spread"] < 1.5 and out["prediction"] < 0 and out["pixel_pcs"] <= 1
    assert out["explained_spread"] == pytest.approx(out["target_spread"] + out["prediction"])
    assert bench.candidate_scores(model, batches, None) == out  # fixed masks, no randomness
