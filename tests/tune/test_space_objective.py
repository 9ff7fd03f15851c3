"""A sweep's search space and objectives, without Ray: bad values are refused before any trial, the
objectives score embeddings whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index

from jepa_ray.config import load_config
from jepa_ray.errors import ConfigError
from jepa_ray.tune.objective import cv_cindex, measure, pick_label, probe_auroc
from jepa_ray.tune.results import (
    _markdown,
    best_config,
    best_row,
    candidate_spearman,
    runner_up_gap,
    spearman,
)
from jepa_ray.tune.space import check_space, trials_planned, tune_space

GRID = (
    "tune.space={pipeline.mask.mask_ratio: {values: [0.4, 0.6]}, model.predictor_depth: {values: [1, 2, 3]}}"
)


def _cfg(*overrides: str):
    return load_config(overrides=["train.steps=100", "train.warmup_steps=10", *overrides])


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            "{pipeline.mask.mask_ratio: {values: [0.5, 1.2]}}",
            "pipeline.mask.mask_ratio: value 1.2 is not allowed",
        ),
        ("{model.predictor_depth: {values: [0, 2]}}", "model.predictor_depth: value 0 is not allowed"),
        (
            "{model.predictor_depth: {uniform: [1, 4]}}",
            "value 2.5 is not allowed",
        ),  # an int key, a float range
        ("{pipeline.mask.mask_ratio: {uniform: [0.2, 1.0]}}", "value 1.0 is not allowed"),  # the open end
        ("{pipeline.mask.num_target_blocks: {randint: [1, 40]}}", "value 40 is not allowed"),
        ("{model.predictor_dpth: {values: [1]}}", "model.predictor_dpth: no such config key"),
        ("{train.shards: {values: [a, b]}}", "train.shards: this key cannot be swept"),
        ("{}", "tune.space is empty"),
    ],
)
def test_out_of_range_values_fail_naming_key_and_value(space, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_space(_cfg(f"tune.space={space}", "tune.searcher=random"))


@pytest.mark.parametrize(
    ("space", "why"),
    [
        ("{model.objective: {values: [jepa, mae]}}", "losses of different kinds do not compare"),
        ("{model.sigreg: {values: [0.0, 0.1]}}", "it weighs a second term into the loss"),
        ("{model.ema: {values: [[0.99, 1.0], [0.996, 1.0]]}}", "it changes the target encoder whose latents"),
        (
            "{pipeline.mask.mask_ratio: {values: [0.4, 0.6]}, model.predictor_depth: {values: [1, 2]}}",
            "the loss measures the predictor as much as the encoder",
        ),
    ],
)
def test_val_loss_is_refused_for_a_sweep_that_changes_the_loss_or_the_predictor(space, why):
    from jepa_ray.tune.sweep import check_objective

    cfg = _cfg(f"tune.space={space}", "tune.objective=val_loss")
    key = space.split(":")[0].strip("{") if "predictor" not in space else "model.predictor_depth"
    with pytest.raises(ConfigError, match=rf"tune.objective=val_loss: the sweep varies {key}, and {why}"):
        check_objective(cfg, "val_loss", 1000)
    check_objective(cfg, "lidar_context", 1000)  # the same sweep under another objective is fine
    # measured beside another objective (tune.measure_all), a confounded loss is still measured, so a
    # user sees it fail to rank; losses of different kinds are not one quantity and are not
    if "model.objective" in space:
        with pytest.raises(ConfigError, match="losses of different kinds"):
            check_objective(cfg, "val_loss", 1000, ranks=False)
    else:
        check_objective(cfg, "val_loss", 1000, ranks=False)
    # mask ratio and learning rate leave the loss comparable (every trial answers the same masks)
    check_objective(
        _cfg(
            "tune.space={pipeline.mask.mask_ratio: {values: [0.4, 0.6]}, train.lr: {values: [0.001, 0.003]}}"
        ),
        "val_loss",
        1000,
    )


def test_dimension_needs_exactly_one_kind():
    with pytest.raises(ConfigError, match="give exactly one of values, uniform, loguniform, randint"):
        _cfg("tune.space={train.lr: {values: [0.001], loguniform: [0.0001, 0.01]}}")
    with pytest.raises(ConfigError, match="loguniform: need low > 0"):
        _cfg("tune.space={train.lr: {loguniform: [0, 0.01]}}")


def test_grid_needs_lists_and_every_combination_valid():
    with pytest.raises(ConfigError, match=r"searcher=grid needs a list of values.*train.lr is a range"):
        check_space(_cfg("tune.space={train.lr: {loguniform: [0.0001, 0.01]}}"))
    # each value is valid alone; together 20 context patches can't be kept on a 4x4 grid
    clash = "tune.space={pipeline.patch_size: {values: [8, 16]}, pipeline.mask.min_context_patches: {values: [10, 20]}}"
    with pytest.raises(
        ConfigError, match=r"trial pipeline.patch_size=16, pipeline.mask.min_context_patches=20"
    ):
        check_space(_cfg(clash, "pipeline.image_size=64", "pipeline.patch_size=8"))
    with pytest.raises(ConfigError, match=r"grace_period=100 is not below train\.steps=100"):
        check_space(_cfg(GRID, "tune.asha.grace_period=100"))


def test_grid_and_samplers_become_tune_space():
    cfg = _cfg(GRID, "tune.num_samples=2")
    check_space(cfg)
    assert trials_planned(cfg) == 12
    space = tune_space(cfg)
    assert space["pipeline.mask.mask_ratio"] == {"grid_search": [0.4, 0.6]}
    # 1e-5 is a number in the config already (read as YAML 1.2), and typed again for the trials
    exponent = _cfg(
        "tune.space={train.lr: {values: [1e-5, 0.001]}, train.weight_decay: {values: [[0, 1e-2]]}}"
    )
    assert exponent.tune.space["train.lr"].values == [1e-5, 0.001]
    typed = tune_space(exponent)
    assert typed["train.lr"] == {"grid_search": [1e-5, 0.001]}
    assert typed["train.weight_decay"] == {"grid_search": [[0.0, 0.01]]}
    assert all(type(v) is float for v in typed["train.lr"]["grid_search"])
    cfg = _cfg(
        "tune.searcher=random",
        "tune.num_samples=5",
        "tune.space={model.predictor_depth: {randint: [1, 3]}, train.lr: {loguniform: [0.0001, 0.01]}}",
    )
    check_space(cfg)
    assert trials_planned(cfg) == 5
    space = tune_space(cfg)
    draws = {space["model.predictor_depth"].sample() for _ in range(200)}
    assert draws == {1, 2, 3}  # both ends included
    lrs = [space["train.lr"].sample() for _ in range(200)]
    assert min(lrs) >= 1e-4 and max(lrs) <= 1e-2


def test_probe_auroc_and_cindex_are_out_of_fold_and_see_signal():
    rng = np.random.default_rng(0)
    n = 120
    signal = rng.standard_normal(n)
    x = np.c_[signal, rng.standard_normal((n, 7))]
    y = (signal + 0.5 * rng.standard_normal(n) > 0).astype(float)
    assert probe_auroc(x, y) > 0.8
    assert 0.3 < probe_auroc(rng.standard_normal((n, 8)), y) < 0.7  # no signal: near chance
    assert np.isnan(probe_auroc(x[:10], np.r_[1.0, np.zeros(9)]))  # one positive cannot be folded
    days = np.exp(-signal + 0.3 * rng.standard_normal(n)) * 100
    event = rng.random(n) < 0.7
    c = cv_cindex(x, days, event)
    assert c > 0.75
    # out of fold it is below the in-sample fit of a model that has seen the answer
    assert c < concordance_index(days, -signal, event) + 1e-9
    assert np.isnan(cv_cindex(x, days, np.zeros(n, bool)))


def test_pick_label_names_what_the_split_has():
    metas = [
        {
            "labels": {"cardiomegaly": True, "abnormal_lung": False},
            "tte": {"death": {"days": 3, "event": True}},
        }
    ]
    assert pick_label(metas, "rankme", None) is None
    assert pick_label(metas, "probe_auroc", None) == "abnormal_lung"
    assert pick_label(metas, "probe_auroc", "cardiomegaly") == "cardiomegaly"
    assert pick_label(metas, "cindex", None) == "death"
    with pytest.raises(ConfigError, match=r"tune.label='pneumonia'.*it has: abnormal_lung, cardiomegaly"):
        pick_label(metas, "probe_auroc", "pneumonia")
    with pytest.raises(ConfigError, match="carry no time-to-event outcomes; use objective rankme"):
        pick_label([{"labels": {}}], "cindex", None)


class _Embeds:
    """A stand-in encoder: `encode` returns the batch's own vectors as the pooled embedding."""

    def encode(self, b, modality):
        assert modality == "both"
        return {"pooled": b["x"]}


def test_measure_reports_rankme_and_the_labelled_objective():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 6)).astype(np.float32)
    y = x[:, 0] > 0
    metas = [json.dumps({"labels": {"sick": bool(v)}}) for v in y]
    metas[0] = json.dumps({"labels": {}})  # unlabelled samples are left out, and counted
    batches = [{"x": torch.from_numpy(x[i : i + 20]), "meta": metas[i : i + 20]} for i in range(0, 60, 20)]
    out = measure(_Embeds(), batches, "probe_auroc", "sick")
    assert out["objective"] == out["probe_auroc"] > 0.9
    assert out["objective_samples"] == 59
    assert 5 < out["rankme"] <= 6
    flat = measure(_Embeds(), [{"x": torch.ones(20, 6), "meta": metas[:20]}], "rankme", None)
    assert flat["objective"] == flat["rankme"] < 1.5  # collapsed embeddings: rank ~1


def test_best_is_chosen_among_the_longest_runs_and_written_as_a_runnable_config():
    rows = [
        {"trial": "a", "pipeline.mask.mask_ratio": 0.4, "objective": 0.9, "rankme": 9.0, "steps": 20, "status": "TERMINATED"},
        {"trial": "b", "pipeline.mask.mask_ratio": 0.6, "objective": 0.7, "rankme": 5.0, "steps": 100, "status": "TERMINATED"},
        {"trial": "c", "pipeline.mask.mask_ratio": 0.8, "objective": 0.6, "rankme": 4.0, "steps": 100, "status": "TERMINATED"},
        {"trial": "d", "pipeline.mask.mask_ratio": 0.5, "objective": None, "rankme": None, "steps": 3, "status": "ERROR"},
    ]  # fmt: skip
    best = best_row(rows)
    assert best["trial"] == "b"  # "a" scored higher, but after 20 steps, not 100
    hist = {  # RankMe falls as training goes on; compared at step 20, the last all trials reached
        "a": [(10, 0.8, 9.5), (20, 0.9, 9.0)],
        "b": [(10, 0.5, 8.0), (20, 0.6, 7.0), (100, 0.7, 5.0)],
        "c": [(10, 0.4, 7.5), (20, 0.5, 6.0), (100, 0.6, 4.0)],
        "d": [(10, 0.3, 7.0), (15, 0.1, 1.0)],
    }
    assert spearman(hist) == {"rho": pytest.approx(1.0), "step": 15, "trials": 4}
    hist["d"] = [(10, 0.3, 7.0), (20, 0.95, 6.5)]  # now d scores best with the lowest RankMe
    assert spearman(hist)["step"] == 20 and spearman(hist)["rho"] == pytest.approx(0.4)
    # at a later step, among the trials that reached it: too few there
    assert spearman(hist, at=10)["trials"] == 4 and spearman(hist, at=100) is None
    # the best against the runner-up that ran as long, with both standard errors
    rows[1]["objective_se"], rows[2]["objective_se"] = 0.02, 0.03
    gap = runner_up_gap(rows, best)
    assert gap["runner_up"] == "c" and gap["gap"] == pytest.approx(0.1)
    assert gap["se"] == pytest.approx((0.02**2 + 0.03**2) ** 0.5) and gap["beyond_noise"] is True
    rows[2]["objective_se"] = 0.06
    assert runner_up_gap(rows, best)["beyond_noise"] is False
    cfg = _cfg(
        "tune.space={pipeline.mask.mask_ratio: {values: [0.4, 0.6, 0.8]}}", "train.shards=/data/shards"
    )
    data = best_config(cfg, best)
    assert "tune" not in data and data["pipeline"]["mask"]["mask_ratio"] == 0.6
    assert data["train"]["shards"] == "/data/shards"
    # a collapsed trial (its objective left out, like a failed one's) is never the best, and is named
    rows.append({"trial": "e", "pipeline.mask.mask_ratio": 0.9, "objective": None, "rankme": 1.2, "collapsed": True, "steps": 100, "status": "TERMINATED"})  # fmt: skip
    assert best_row(rows)["trial"] == "b"
    md = _markdown(
        cfg, [r | {"stopped_early": False} for r in rows], best_row(rows), None, {"kind": "val_loss"}
    )
    assert (
        "Collapsed (below half the starting encoder's RankMe or spread; ranked last, whatever val_loss said): e."
        in md
    )


def test_optuna_proposes_values_inside_the_space():
    from jepa_ray.tune.sweep import search_algorithm

    cfg = _cfg(
        "tune.searcher=optuna",
        "tune.num_samples=8",
        "tune.space={pipeline.mask.mask_ratio: {uniform: [0.3, 0.8]}, model.predictor_depth: {values: [1, 2, 4]}}",
    )
    check_space(cfg)
    alg = search_algorithm(cfg, at_once=2)
    assert alg.set_search_properties("objective", "max", tune_space(cfg))
    proposals = [alg.suggest(f"t{i}") for i in range(3)]
    assert proposals[2] is None  # two at once: the third waits for a result
    for p in proposals[:2]:
        assert 0.3 <= p["pipeline.mask.mask_ratio"] <= 0.8 and p["model.predictor_depth"] in (1, 2, 4)
        _cfg(*(f"{k}={v}" for k, v in p.items()))  # every proposal is a valid config
    alg.on_trial_complete("t0", {"objective": 0.7, "pipeline.mask.mask_ratio": 0.5})
    assert alg.suggest("t3") is not None


def test_cindex_objective_and_heatmap_of_list_valued_keys(tmp_path):
    from jepa_ray.tune.results import heatmap

    rng = np.random.default_rng(2)
    x = rng.standard_normal((80, 5)).astype(np.float32)
    days = np.exp(-x[:, 0]) * 100
    metas = [
        json.dumps({"tte": {"death": {"days": float(d), "event": bool(i % 4)}}}) for i, d in enumerate(days)
    ]
    metas[5] = json.dumps({"tte": {}})  # no follow-up: left out
    batches = [{"x": torch.from_numpy(x[i : i + 40]), "meta": metas[i : i + 40]} for i in (0, 40)]
    out = measure(_Embeds(), batches, "cindex", "death")
    assert out["objective"] == out["cindex"] > 0.8 and out["objective_samples"] == 79

    cfg = _cfg(
        "tune.space={pipeline.mask.target_scale: {values: [[0.1, 0.15], [0.15, 0.2]]}, "
        "model.predictor_depth: {values: [1, 2]}}"
    )
    check_space(cfg)
    rows = [
        {
            "pipeline.mask.target_scale": ts,
            "model.predictor_depth": d,
            "objective": 0.5 + 0.1 * d,
            "steps": 10,
        }
        for ts in ([0.1, 0.15], [0.15, 0.2])
        for d in (1, 2)
    ]
    png = heatmap(cfg, rows, tmp_path / "h.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_collapsed_trials_row_has_no_objective_and_says_why():
    """What Tune recorded (the guard's -1e30 reached ASHA) becomes a row that is never the best."""
    from types import SimpleNamespace

    from jepa_ray.tune.objective import COLLAPSED
    from jepa_ray.tune.results import trial_rows

    cfg = _cfg("tune.space={pipeline.mask.mask_ratio: {values: [0.4, 0.6]}}", "train.steps=100")

    def result(trial, mask, objective, collapsed):
        metrics = {
            "trial_id": trial,
            "step": 100,
            "objective": objective,
            "objective_se": 0.01,
            "rankme": 9.0,
            "done": True,
        }
        metrics |= {"spread": 0.6, "collapsed": float(collapsed)}
        return SimpleNamespace(
            metrics=metrics, config={"pipeline.mask.mask_ratio": mask}, error=None, path=trial
        )

    rows = trial_rows(
        cfg, [result("a", 0.4, -0.6, False), result("b", 0.6, COLLAPSED, True)], {"kind": "val_loss"}
    )
    a, b = rows
    assert (a["objective"], a["collapsed"], b["objective"], b["collapsed"]) == (-0.6, False, None, True)
    assert "objective_samples" not in a  # a label-free objective counts no labelled samples
    assert best_row(rows)["trial"] == "a" and runner_up_gap(rows, best_row(rows)) is None


def test_a_trial_the_sweeps_interruption_cut_short_is_unfinished_not_stopped_early(tmp_path):
    """A trial ended when it ran all its steps or ASHA stopped it (Tune marks that result `done`);
    one running, or not yet started, when the sweep was interrupted is UNFINISHED, named in the
    summary, and never counted as stopped by ASHA."""
    from types import SimpleNamespace

    from jepa_ray.tune.results import heatmap, trial_rows

    cfg = _cfg(
        "tune.space={pipeline.mask.mask_ratio: {values: [0.3, 0.5]}, model.predictor_depth: {values: [1, 2]}}",
        "train.steps=100",
    )

    def result(trial, step, done, error=None, **config):
        metrics = {"trial_id": trial, "step": step, "objective": -0.7, "objective_se": 0.01} if step else {}
        metrics |= {"trial_id": trial, **({"done": True} if done else {})}
        # Tune's Result carries a trial's config with its reports: none before the first
        config = {"pipeline.mask.mask_ratio": 0.5, "model.predictor_depth": 1, **config} if step else None
        return SimpleNamespace(metrics=metrics, config=config, error=error, path=trial)

    grid = [result("a", 100, True), result("b", 40, True), result("c", 60, False), result("d", 0, False)]
    grid.append(result("f", 100, False))  # finished before the interruption: read back without `done`
    grid.append(result("g", 50, False, **{"train.steps": 50}))  # its own (swept) number of steps
    rows = trial_rows(
        cfg, [*grid, result("e", 20, False, error=RuntimeError("worker died"))], {"kind": "val_loss"}
    )
    assert [(r["trial"], r["status"], r["stopped_early"]) for r in rows] == [
        ("a", "TERMINATED", False),
        ("b", "TERMINATED", True),  # ASHA's stop
        ("c", "UNFINISHED", False),  # running when the sweep was interrupted
        ("d", "UNFINISHED", False),  # not started
        ("e", "ERROR", False),
        ("f", "TERMINATED", False),
        ("g", "TERMINATED", False),
    ]
    assert rows[3]["pipeline.mask.mask_ratio"] is None
    text = _markdown(
        cfg,
        rows,
        best_row(rows),
        None,
        {"kind": "val_loss", "label": None},
        runner_up_gap(rows, best_row(rows)),
    )
    assert "Stopped early by ASHA: 1 of 7." in text
    assert "Unfinished (the sweep was interrupted; `jepa-ray tune --resume` runs them on): c, d." in text
    # the heat map is drawn from the trials that reported (the unstarted one's parameters are unknown)
    assert heatmap(cfg, rows, tmp_path / "heatmap.png").stat().st_size > 5000


def test_a_trials_hooks_reach_ray_trains_controller_without_torch():
    """Ray Train's controller (one per run and per sweep trial, on the head node) unpickles the loop
    config, the trial's hooks with it: a fresh process loads what a sweep sends without importing
    torch or the training loop."""
    import subprocess
    import sys

    import ray.cloudpickle

    from jepa_ray.tune.hooks import ObjectiveHooks

    cfg = _cfg()
    objective = {
        "kind": "val_loss",
        "label": None,
        "batches": 2,
        "mask": cfg.pipeline.mask.model_dump(mode="json"),
    }
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "dims": {"patches": 16},
        "hooks": ObjectiveHooks(objective),
    }
    code = (
        "import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); "
        "print(c['hooks'].val_batches, [m for m in ('torch', 'jepa_ray.train.loop') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=ray.cloudpickle.dumps(loop_config),
        capture_output=True,
        check=True,
    )
    assert out.stdout.decode().split() == ["2", "[]"], out.stderr.decode()[-2000:]


def test_a_predictor_sweep_under_a_heavy_sigreg_weight_is_warned_about():
    """At a heavy SIGReg weight (LeJEPA's 0.05 on its statistic is ~0.94 on the distance) the
    predictor's shape does not change the image encoder, so a sweep over it would spend every trial
    on one encoder; at the default weight, or with a sweep that takes SIGReg below the threshold, or
    one that leaves the predictor alone, no warning."""
    from jepa_ray.tune.space import SIGREG_OWNS_ENCODER, predictor_sweep_warning

    warned = predictor_sweep_warning(_cfg(GRID, "model.sigreg=0.9"))
    assert warned is not None and "model.predictor_depth" in warned and "model.sigreg" in warned
    wide = "tune.space={model.predictor_width: {values: [32, 64]}, model.predictor_depth: {values: [1, 2]}}"
    assert "model.predictor_depth, model.predictor_width" in predictor_sweep_warning(
        _cfg(wide, f"model.sigreg={SIGREG_OWNS_ENCODER}")
    )
    assert _cfg(GRID).model.sigreg < SIGREG_OWNS_ENCODER and predictor_sweep_warning(_cfg(GRID)) is None
    assert predictor_sweep_warning(_cfg(GRID, f"model.sigreg={SIGREG_OWNS_ENCODER / 10}")) is None
    with_sigreg = "tune.space={model.predictor_depth: {values: [1, 2]}, model.sigreg: {values: [0.9, 0.1]}}"
    assert predictor_sweep_warning(_cfg(with_sigreg)) is None
    heavy = "tune.space={model.predictor_depth: {values: [1, 2]}, model.sigreg: {values: [0.9, 0.3]}}"
    assert "model.sigreg >= 0.3" in predictor_sweep_warning(_cfg(heavy))
    masks_only = "tune.space={pipeline.mask.mask_ratio: {values: [0.4, 0.6]}}"
    assert predictor_sweep_warning(_cfg(masks_only)) is None


def test_a_labelled_sweep_reports_how_each_label_free_objective_ranks_its_trials():
    """tune.measure_all under a labelled objective: each label-free objective's Spearman with it,
    taken at the last step every trial reached (a trial ASHA stopped at step 4 sets it)."""
    from types import SimpleNamespace

    import pandas as pd

    def result(trial, steps, objective, val_loss, rankme):
        df = pd.DataFrame(
            {
                "step": steps,
                "objective": objective,
                "lf_val_loss": val_loss,
                "lf_val_loss_se": [0.01] * len(steps),
                "lf_rankme": rankme,
            }
        )
        return SimpleNamespace(metrics_dataframe=df, metrics={"trial_id": trial}, path=trial)

    grid = [
        result("a", [4, 8], [0.60, 0.70], [-0.9, -0.8], [12.0, 11.0]),
        result("b", [4, 8], [0.65, 0.66], [-0.7, -0.9], [10.0, 13.0]),
        result("c", [4], [0.55], [-1.0], [14.0]),  # stopped at the first rung
        result("d", [4, 8], [0.70, 0.50], [-0.6, -0.5], [9.0, 8.0]),
    ]
    got = candidate_spearman(grid)
    # at step 4 the objective orders c < a < b < d; val_loss agrees, RankMe reverses it
    assert got == {
        "rankme": {"rho": pytest.approx(-1.0), "step": 4, "trials": 4},
        "val_loss": {"rho": pytest.approx(1.0), "step": 4, "trials": 4},
    }
    at8 = candidate_spearman(grid, at=8)  # among the 3 that reached step 8: a 0.70, b 0.66, d 0.50
    assert at8["val_loss"]["trials"] == 3 and at8["val_loss"]["rho"] == pytest.approx(-0.5)
    cfg = _cfg("tune.space={pipeline.mask.mask_ratio: {values: [0.4, 0.6]}}")
    md = _markdown(cfg, [], None, None, {"kind": "probe_auroc", "label": "sick"}, None, got)
    assert (
        "Spearman correlation of val_loss with the objective across trials: +1.00 (4 trials, at step 4)" in md
    )
    assert "Spearman correlation of rankme with the objective across trials: -1.00" in md
    assert "Spearman correlation of RankMe" not in md  # the candidates' table replaces the RankMe line
    few = candidate_spearman(grid[:2])  # two trials cannot be ranked
    assert few == {"rankme": None, "val_loss": None}
    assert "val_loss with the objective across trials: not enough trials" in _markdown(
        cfg, [], None, None, {"kind": "probe_auroc"}, None, few
    )
