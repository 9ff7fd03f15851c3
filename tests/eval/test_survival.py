"""Time-to-event heads and c-indices: library numbers against a second implementation, fusion on a
problem where each modality carries half of the hazard, missing modalities, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index

from jepa_ray.eval import survival
from jepa_ray.eval.survival import STRATEGIES, FusionInputs, evaluate_survival, harrell, uno


def test_harrell_matches_lifelines_with_ties_and_censoring():
    rng = np.random.default_rng(0)
    for _ in range(5):
        time = rng.integers(1, 30, 300).astype(float)  # many tied times
        event = rng.random(300) < 0.6
        risk = rng.integers(0, 8, 300).astype(float)  # many tied risks
        # lifelines takes predicted survival times: higher means later, hence -risk
        assert harrell(time, event, risk) == pytest.approx(concordance_index(time, -risk, event), abs=1e-6)
    # and scikit-survival's, which counts a censored sample at an event's time as comparable
    from sksurv.metrics import concordance_index_censored

    for n in (7, 60, 700, 1500):  # both ways of counting (the second past 1,000 samples)
        time = rng.integers(1, 30, n).astype(float)
        event = rng.random(n) < 0.4
        event[0] = True
        risk = np.round(rng.standard_normal(n), 1)
        assert harrell(time, event, risk) == pytest.approx(
            concordance_index_censored(event, time, risk)[0], abs=1e-12
        )


def test_harrell_refuses_what_it_cannot_score():
    time, event = np.arange(1.0, 6.0), np.array([1, 0, 1, 0, 0], bool)
    with pytest.raises(ValueError, match="2 of 5 risks are not finite"):
        harrell(time, event, np.array([0.1, np.nan, 0.3, np.inf, 0.0]))
    with pytest.raises(ValueError, match="5 times, 5 events and risks of shape \\(4,\\)"):
        harrell(time, event, np.zeros(4))
    with pytest.raises(ValueError, match="all 5 samples are censored"):
        harrell(time, np.zeros(5, bool), np.zeros(5))
    assert np.isnan(harrell(np.ones(3), np.array([1, 1, 1], bool), np.arange(3.0)))  # no comparable pair


def test_the_ridge_cox_fit_is_scikit_survivals():
    """RidgeCox's Newton fit (Breslow's ties, the ridge on the mean partial likelihood) lands on
    scikit-survival's CoxPHSurvivalAnalysis coefficients, tied times and all; rows it cannot fit
    on are refused by name."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    from jepa_ray.eval.survival import RidgeCox, ridge_cox_coefficients

    rng = np.random.default_rng(4)
    for n, p, alpha in ((40, 3, 1.0), (400, 12, 10.0), (150, 20, 0.01)):
        x = rng.standard_normal((n, p))
        time = rng.integers(1, 30, n).astype(float)  # many tied times
        event = rng.random(n) < 0.5
        time[event] = np.maximum(1, np.round(time[event] + 5 - 2 * x[event, 0]))  # a signal; ties kept
        ref = CoxPHSurvivalAnalysis(alpha=alpha, n_iter=200).fit(x, Surv.from_arrays(event, time)).coef_
        assert ridge_cox_coefficients(x, time, event, alpha) == pytest.approx(ref, abs=1e-8)
    with pytest.raises(ValueError, match="40 rows with 0 events"):
        RidgeCox(x[:40], time[:40], np.zeros(40, bool))
    with pytest.raises(ValueError, match="none of the 2 features varies"):
        RidgeCox(np.ones((40, 2)), time[:40], event[:40])


def _uno_reference(train_t, train_e, t, e, r, tau):
    """Uno et al. (2011): sum over events i before tau and later j of G(T_i)^-2 [r_i > r_j] (1/2 for
    tied risks) / the same without the indicator; G = Kaplan-Meier of the censoring on the training
    split. Written for distinct times (the definitions of tied event/censoring times differ)."""

    def g(x):
        cens = np.sort(train_t[~train_e])
        at_risk = np.array([(train_t >= c).sum() for c in cens])
        return np.prod(1 - 1 / at_risk[cens <= x])

    num = den = 0.0
    for i in np.flatnonzero(e & (t < tau)):
        w = g(t[i]) ** -2
        later = t > t[i]
        num += w * ((r[i] > r[later]).sum() + 0.5 * (r[i] == r[later]).sum())
        den += w * later.sum()
    return num / den


def test_uno_matches_a_reference_implementation_of_the_formula():
    rng = np.random.default_rng(1)
    for _ in range(3):
        train_t, train_e = rng.exponential(10, 400), rng.random(400) < 0.5
        t, e = rng.exponential(10, 150), rng.random(150) < 0.5
        r = rng.integers(0, 6, 150).astype(float) - 0.1 * t  # informative, with ties
        tau = float(np.quantile(train_t, 0.9))
        ref = _uno_reference(train_t, train_e, t, e, r, tau)
        assert uno(train_t, train_e, t, e, r) == pytest.approx(ref, abs=1e-6)


# how the two halves of the hazard are written into the tokens (the same in every split)
IMG_DIRECTION = 0.5 * np.random.default_rng(100).standard_normal((1, 4, 16))
EHR_DIRECTION = 0.5 * np.random.default_rng(101).standard_normal((1, 6, 16))


@pytest.mark.parametrize("rows", [256, 7])  # one block of pairs, and many
def test_the_bootstrap_intervals_score_the_same_resamples_as_scikit_survival(rows):
    from jepa_ray.eval.probes import bootstrap_ci

    rng = np.random.default_rng(4)
    n = 90
    time = rng.integers(1, 40, n).astype(float)  # tied times
    event = rng.random(n) < 0.6
    risk = np.round(rng.standard_normal(n) - 0.03 * time, 1)  # tied risks
    train_time, train_event = rng.integers(1, 45, 300).astype(float), rng.random(300) < 0.5
    valid = lambda t, e, r: survival.cindex_defined(t, e)  # noqa: E731
    for weight, metric in (
        (np.ones(n), harrell),
        (
            survival.uno_weights(train_time, train_event, time, event),
            lambda t, e, r: uno(train_time, train_event, t, e, r),
        ),
    ):
        fast = survival.bootstrap_cindex(time, event, risk, weight, 60, seed=3, rows=rows)
        assert fast == pytest.approx(bootstrap_ci(metric, (time, event, risk), 60, 3, valid), abs=1e-12)
    assert survival.bootstrap_cindex(time, event, risk, np.ones(n), 0, seed=3) is None
    censored = np.zeros(n, bool)  # no event in any resample: no interval
    assert survival.bootstrap_cindex(time, censored, risk, np.ones(n), 20, seed=3) is None


def test_the_paired_interval_scores_both_risks_on_the_same_resamples():
    """paired_cindex: the two c-indices, and the percentiles of their difference over the very
    resamples `bootstrap_cindex` draws, each scoring both risks; a risk that orders the samples is
    beyond noise against one that does not, and a risk against itself is no difference at all."""
    from jepa_ray.eval.probes import bootstrap_indices

    rng = np.random.default_rng(5)
    n = 120
    time = rng.integers(1, 50, n).astype(float)  # tied times
    event = rng.random(n) < 0.6
    good = np.round(-time / 10 + rng.standard_normal(n), 1)  # earlier events, higher risk; ties
    noise = np.round(rng.standard_normal(n), 1)
    d = survival.paired_cindex(time, event, good, noise, 80, seed=3)
    assert d["a"] == pytest.approx(harrell(time, event, good)) and d["b"] == pytest.approx(
        harrell(time, event, noise)
    )
    assert d["difference"] == pytest.approx(d["a"] - d["b"]) and d["n"] == n
    draws = bootstrap_indices(n, 80, 3, lambda idx: survival.cindex_defined(time[idx], event[idx]))
    slow = [harrell(time[i], event[i], good[i]) - harrell(time[i], event[i], noise[i]) for i in draws]
    assert d["ci95"] == pytest.approx(list(np.percentile(slow, [2.5, 97.5])), abs=1e-12)
    assert d["a"] > 0.7 and d["beyond_noise"] and d["ci95"][0] > 0
    same = survival.paired_cindex(time, event, good, good.copy(), 50, seed=3)
    assert same["difference"] == 0 and same["ci95"] == [0, 0] and same["beyond_noise"] is False
    off = survival.paired_cindex(time, event, good, noise, 0, seed=3)
    assert off["ci95"] is None and off["beyond_noise"] is None and off["difference"] == d["difference"]
    # several runs on the same samples: the mean difference, each resample scoring every run
    runs_a = np.stack([good, np.round(-time / 10 + rng.standard_normal(n), 1)])
    runs_b = np.stack([noise, np.round(rng.standard_normal(n), 1)])
    m = survival.paired_cindex(time, event, runs_a, runs_b, 80, seed=3)
    per_run = [harrell(time, event, a) - harrell(time, event, b) for a, b in zip(runs_a, runs_b, strict=True)]
    assert m["difference"] == pytest.approx(np.mean(per_run))
    slow = [
        np.mean(
            [
                harrell(time[i], event[i], a[i]) - harrell(time[i], event[i], b[i])
                for a, b in zip(runs_a, runs_b, strict=True)
            ]
        )
        for i in draws
    ]
    assert m["ci95"] == pytest.approx(list(np.percentile(slow, [2.5, 97.5])), abs=1e-12)
    with pytest.raises(ValueError, match="one per sample and run"):
        survival.paired_cindex(time, event, runs_a, noise, 10, seed=3)


def _pair_counts(time, event, risk):
    """Harrell's comparable and concordant pairs (ties in risk: one half), by a slow loop."""
    comp = conc = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[j] > time[i] or (time[j] == time[i] and not event[j])):
                comp += 1
                conc += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return comp, conc


def test_strata_count_only_the_pairs_within_a_stratum():
    """strata (the folds of a cross-fit): the c-index of the pairs within each stratum, pooled;
    a shift of one stratum's risks, which moves the unstratified c-index, leaves it unchanged."""
    rng = np.random.default_rng(9)
    n = 90
    time = rng.integers(1, 40, n).astype(float)
    event = rng.random(n) < 0.6
    risk = np.round(-time / 10 + rng.standard_normal(n), 1)
    strata = rng.integers(0, 3, n)
    shifted = risk + 5.0 * (strata == 1)
    counts = [_pair_counts(time[strata == s], event[strata == s], risk[strata == s]) for s in range(3)]
    expected = sum(c for _, c in counts) / sum(p for p, _ in counts)
    every = [np.arange(n)]
    both = survival.resampled_cindex(time, event, np.stack([risk, shifted]), np.ones(n), every, strata=strata)
    assert both[:, 0] == pytest.approx([expected, expected], abs=1e-12)
    assert harrell(time, event, shifted) != pytest.approx(expected, abs=1e-3)  # the shift shows unstratified
    assert harrell(time, event, shifted, strata) == pytest.approx(expected, abs=1e-12)
    d = survival.paired_cindex(time, event, shifted, risk, 40, seed=1, strata=strata)
    assert d["a"] == pytest.approx(expected) and d["difference"] == pytest.approx(0, abs=1e-12)
    assert d["ci95"] == pytest.approx([0, 0], abs=1e-12)
    one = survival.paired_cindex(time, event, risk, shifted, 40, seed=1, strata=np.zeros(n))
    assert one["a"] == pytest.approx(harrell(time, event, risk)) and one["b"] == pytest.approx(
        harrell(time, event, shifted)
    )


def test_kept_risks_are_the_scored_rows_of_each_split_and_give_its_c_index():
    """keep_risks: each strategy's risks with the rows of the split they belong to, which leave out
    the samples a head cannot score (no image) and those without follow-up."""
    rng = np.random.default_rng(13)
    splits = {"train": _problem(300, rng), "val": _problem(80, rng), "test": _problem(200, rng, missing=0.3)}
    splits["test"].time[:10] = np.nan  # no follow-up
    res = evaluate_survival(
        splits, strategies=("image", "ehr", "late_fusion"), report_splits=("test",), bootstrap=0, epochs=20,
        keep_risks=True,
    )  # fmt: skip
    test = splits["test"]
    for name in ("image", "ehr", "late_fusion"):
        rows, risk = res["risks"][name]["test"]
        assert len(rows) == len(risk) == res["cindex"][name]["test"]["n"]
        assert res["cindex"][name]["test"]["harrell"] == pytest.approx(
            harrell(test.time[rows], test.event[rows], risk)
        )
        assert not np.isnan(test.time[rows]).any()
    image_rows = res["risks"]["image"]["test"][0]
    assert test.has_image[image_rows].all() and len(image_rows) == int((test.has_image[10:]).sum())
    assert "risks" not in evaluate_survival(
        splits, strategies=("ehr",), report_splits=("test",), bootstrap=0, epochs=5
    )


def _problem(
    n: int, rng, missing: float = 0.0, img_weight: float = 1.0, ehr_weight: float = 1.0
) -> FusionInputs:
    """log-hazard = img_weight a + ehr_weight b; a is written in the image tokens, b in the EHR
    tokens (plus noise)."""
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    img = a[:, None, None] * IMG_DIRECTION + rng.standard_normal((n, 4, 16))
    ehr = b[:, None, None] * EHR_DIRECTION + rng.standard_normal((n, 6, 16))
    keep = rng.random((n, 6)) < 0.8
    keep[:, 0] = True
    has_image, has_ehr = np.ones(n, bool), np.ones(n, bool)
    drop = rng.random(n) < missing
    side = rng.random(n) < 0.5
    has_image[drop & side], has_ehr[drop & ~side] = False, False
    img[~has_image] = 0
    event_t = rng.exponential(1 / np.exp(img_weight * a + ehr_weight * b))
    cens_t = rng.exponential(2.0, n)
    return FusionInputs(
        img_tokens=img.astype(np.float32),
        ehr_tokens=ehr.astype(np.float32),
        ehr_keep=keep & has_ehr[:, None],
        has_image=has_image,
        has_ehr=has_ehr,
        img_pooled=img.mean(1).astype(np.float32),
        ehr_pooled=(ehr * keep[..., None]).sum(1).astype(np.float32)
        / keep.sum(1, keepdims=True)
        * has_ehr[:, None],
        time=np.minimum(event_t, cens_t) * 365 + 1,
        event=event_t <= cens_t,
    )


def test_every_fusion_strategy_beats_the_best_unimodal_head():
    rng = np.random.default_rng(2)
    splits = {"train": _problem(1500, rng), "val": _problem(300, rng), "test": _problem(800, rng)}
    res = evaluate_survival(splits, report_splits=("test",), bootstrap=20, epochs=300)
    c = {k: v["test"]["harrell"] for k, v in res["cindex"].items()}
    assert set(c) == set(STRATEGIES)
    assert all(0 <= v <= 1 for v in c.values())
    best_unimodal = max(c["image"], c["ehr"])
    assert min(c["image"], c["ehr"]) > 0.6
    for fused in ("late_fusion", "contrastive", "cross_attention", "co_attention"):
        assert c[fused] > best_unimodal + 0.03, (fused, c)
    lo, hi = res["cindex"]["late_fusion"]["test"]["ci95"]["harrell"]
    assert lo < c["late_fusion"] < hi


def test_late_fusion_reuses_the_unimodal_heads_and_scores_as_if_it_fit_its_own(monkeypatch):
    rng = np.random.default_rng(5)
    splits = {"train": _problem(400, rng), "val": _problem(100, rng), "test": _problem(200, rng)}
    alone = evaluate_survival(
        splits, strategies=("late_fusion",), report_splits=("test",), bootstrap=0, epochs=40
    )
    fits = []
    real = survival.fit_cox
    monkeypatch.setattr(
        survival, "fit_cox", lambda head, *a, **k: fits.append(type(head).__name__) or real(head, *a, **k)
    )
    both = evaluate_survival(
        splits, strategies=("image", "ehr", "late_fusion"), report_splits=("test",), bootstrap=0, epochs=40
    )
    assert fits == ["_Pool", "_Linear"]  # image head, EHR head: neither fit twice
    assert both["cindex"]["late_fusion"] == alone["cindex"]["late_fusion"]


def test_late_fusion_weighs_the_two_risks_at_the_optimum_of_their_likelihood():
    """The combiner's two weights minimise the fit split's partial likelihood: a step of 0.05 from
    them in any direction raises it. With the image half of the hazard four times the EHR half,
    the image risk weighs more, and the fused risk orders the test split better than either head."""
    from torchsurv.loss.cox import neg_partial_log_likelihood

    rng = np.random.default_rng(8)
    splits = {"train": _problem(800, rng, img_weight=1.6, ehr_weight=0.4), "val": _problem(200, rng)}
    splits["test"] = _problem(600, rng, img_weight=1.6, ehr_weight=0.4)
    fit = splits["train"]
    parts = {m: survival._Strategy(m, fit, splits["val"], 60, 0) for m in ("image", "ehr")}
    lf = survival._Strategy("late_fusion", fit, splits["val"], 60, 0, parts=parts)
    rows = np.arange(len(fit.time))
    z = lf._unimodal(fit, rows)
    t, e = torch.as_tensor(fit.time, dtype=torch.float32), torch.as_tensor(fit.event)
    w = lf.model.out.weight.detach()[0]

    def loss(weights):
        return float(neg_partial_log_likelihood(z @ weights, e, t))

    for step in ([0.05, 0], [-0.05, 0], [0, 0.05], [0, -0.05]):
        assert loss(w + torch.tensor(step)) > loss(w), step
    assert w[0] > w[1] > 0
    test = splits["test"]
    c = {
        name: harrell(test.time, test.event, model.risk(test, np.arange(len(test.time))))
        for name, model in (*parts.items(), ("late_fusion", lf))
    }
    assert c["late_fusion"] > max(c["image"], c["ehr"]), c


def test_missing_modalities_are_scored_by_fusion_and_counted_out_of_unimodal_heads():
    rng = np.random.default_rng(3)
    splits = {"train": _problem(600, rng, missing=0.3), "test": _problem(300, rng, missing=0.3)}
    splits["test"].time[:7] = np.nan  # no follow-up
    raw = {k: np.where(rng.random(v.ehr_pooled.shape) < 0.2, np.nan, v.ehr_pooled) for k, v in splits.items()}
    res = evaluate_survival(splits, raw=raw, report_splits=("test", "external"), bootstrap=0, epochs=60)
    test = splits["test"]
    followed = ~np.isnan(test.time)
    counts = res["counts"]
    assert counts["image"]["test"] == {
        "scored": int((followed & test.has_image).sum()),
        "excluded_no_image": int((followed & ~test.has_image).sum()),
        "excluded_no_ehr": 0,
        "excluded_no_followup": 7,
    }
    assert counts["ehr"]["test"]["excluded_no_ehr"] == int((followed & ~test.has_ehr).sum()) > 0
    for fused in ("late_fusion", "contrastive", "cross_attention", "co_attention"):
        assert counts[fused]["test"]["scored"] == 300 - 7
        assert 0 <= res["cindex"][fused]["test"]["harrell"] <= 1
    for name, c in counts.items():
        parts = c["test"]["scored"] + c["test"]["excluded_no_image"] + c["test"]["excluded_no_ehr"]
        assert parts + c["test"]["excluded_no_followup"] == 300, name
    assert res["cindex"]["raw_ehr_cox"]["test"]["harrell"] > 0.55  # NaNs imputed, signal kept
    assert res["cindex"]["image"]["external"] == {"note": "split not in the data"}


def test_bad_shapes_name_the_field_and_the_split():
    rng = np.random.default_rng(4)
    good = _problem(50, rng)
    bad = _problem(50, rng)
    bad.event = bad.event[:40]
    with pytest.raises(ValueError, match="test: event has 40 rows, time has 50"):
        evaluate_survival({"train": good, "test": bad}, epochs=1)
    bad = _problem(50, rng)
    bad.img_pooled = bad.img_pooled[:, 0]
    with pytest.raises(ValueError, match="train: img_pooled must have 2 dimensions"):
        evaluate_survival({"train": bad}, epochs=1)


def test_ehr_only_data_scores_the_ehr_heads_and_says_why_the_others_are_missing():
    rng = np.random.default_rng(5)
    splits = {"train": _problem(400, rng), "test": _problem(200, rng)}
    for d in splits.values():
        d.has_image[:] = False
        d.img_tokens[:] = 0
        d.img_pooled[:] = 0
    res = evaluate_survival(splits, report_splits=("test",), bootstrap=0, epochs=60)
    assert res["cindex"]["ehr"]["test"]["harrell"] > 0.55
    for name in ("image", "late_fusion", "contrastive", "cross_attention", "co_attention"):
        assert res["cindex"][name]["test"] == {"note": "no image in the fit split"}


def test_a_split_without_comparable_pairs_gets_a_note_not_a_crash():
    from jepa_ray.eval.survival import _scores

    time = np.array([5.0, 7.0, 9.0, 12.0])
    train = (np.array([1.0, 4.0, 8.0, 20.0]), np.array([True, False, True, False]))
    only_last = np.array([False, False, False, True])  # the one event comes after every other time
    out = _scores(time, only_last, np.arange(4.0), train, bootstrap=10, seed=0)
    assert "harrell" not in out and out["note"].startswith("no comparable pairs") and out["events"] == 1
    out = _scores(time, np.array([True, False, False, False]), np.arange(4.0), train, bootstrap=10, seed=0)
    assert out["harrell"] == 0.0 and "note" not in out  # defined: the earliest event had the lowest risk


def test_the_image_head_finds_a_finding_in_one_token_that_the_pooled_embedding_averages_away():
    """A lesion in one of 16 image regions, anywhere: its token is marked (a direction of its own)
    and its size (another direction) sets the hazard; a mean over the tokens divides it by 16 and
    buries it under the other tokens' variation. The image head attends to the marked token."""
    from jepa_ray.eval.survival import _Linear, _Standard, fit_cox

    def problem(n: int, rng) -> FusionInputs:
        marker, size = np.eye(16)[0], np.eye(16)[1]
        a = rng.standard_normal(n)
        img = 2.0 * rng.standard_normal((n, 16, 16))
        where = rng.integers(0, 16, n)
        img[np.arange(n), where] += 6 * marker + 3 * a[:, None] * size
        event_t, cens_t = rng.exponential(1 / np.exp(a)), rng.exponential(2.0, n)
        return FusionInputs(
            img_tokens=img.astype(np.float32),
            ehr_tokens=np.zeros((n, 2, 16), np.float32),
            ehr_keep=np.zeros((n, 2), bool),
            has_image=np.ones(n, bool),
            has_ehr=np.zeros(n, bool),
            img_pooled=img.mean(1).astype(np.float32),
            ehr_pooled=np.zeros((n, 16), np.float32),
            time=np.minimum(event_t, cens_t) * 365 + 1,
            event=event_t <= cens_t,
        )

    rng = np.random.default_rng(5)
    splits = {"train": problem(1500, rng), "val": problem(300, rng), "test": problem(800, rng)}
    res = evaluate_survival(splits, report_splits=("test",), bootstrap=0, epochs=300)
    attentive = res["cindex"]["image"]["test"]["harrell"]
    # the same Cox fit on the mean-pooled embedding, as the image head was before
    fit, val, test = splits["train"], splits["val"], splits["test"]
    std = _Standard(fit.img_pooled)
    linear = fit_cox(
        _Linear(16), std(fit.img_pooled), fit.time, fit.event, std(val.img_pooled), val.time, val.event, 300
    )
    with torch.no_grad():
        pooled = harrell(test.time, test.event, linear(std(test.img_pooled)).numpy().astype(float))
    # (a Cox model on the lesion's true size reaches about 0.74 here)
    assert attentive > 0.64 and attentive > pooled + 0.05, (attentive, pooled)


def test_a_head_stops_once_its_validation_likelihood_has_not_improved_for_patience_steps():
    """The validation split's hazard runs against the fit split's: every step that fits the one
    worsens the other, so the best weights are the first checked and the fit stops `patience`
    steps later (without patience it runs every step, and keeps those first weights all the same)."""
    from jepa_ray.eval.survival import _Linear, fit_cox

    rng = np.random.default_rng(0)

    def split(n: int, sign: float):
        x = rng.standard_normal((n, 4)).astype(np.float32)
        t = rng.exponential(1 / np.exp(sign * 1.5 * x[:, 0])) * 365 + 1
        return torch.from_numpy(x), t, rng.random(n) < 0.7

    (xf, tf, ef), (xv, tv, ev) = split(300, 1.0), split(200, -1.0)

    class Counting(_Linear):
        steps = 0

        def forward(self, x, *rest):
            Counting.steps += self.training
            return super().forward(x, *rest)

    heads = {}
    for patience in (50, None):
        Counting.steps = 0
        torch.manual_seed(0)
        heads[patience] = fit_cox(Counting(4), xf, tf, ef, xv, tv, ev, steps=1000, patience=patience)
        heads[f"steps {patience}"] = Counting.steps
    assert heads["steps None"] == 1000
    assert heads["steps 50"] == 60  # best at the first check (step 10), then 50 steps
    assert torch.equal(heads[50].out.weight, heads[None].out.weight)  # the same first-checked weights


def test_paired_splits_hold_the_samples_with_both_modalities_and_their_raw_rows():
    """`with_paired` adds "<split>_paired" for each split asked for: its samples with both
    modalities, their raw EHR rows aligned; the splits it was given stay as they were."""
    rng = np.random.default_rng(9)
    inputs = {"train": _problem(60, rng, missing=0.5), "test": _problem(50, rng, missing=0.5)}
    raw = {k: np.arange(len(v.time), dtype=float)[:, None] * [1.0, -1.0] for k, v in inputs.items()}
    got, got_raw = survival.with_paired(inputs, raw, ("test", "external"))
    assert set(got) == {"train", "test", "test_paired"} == set(got_raw)
    rows = np.flatnonzero(inputs["test"].has_image & inputs["test"].has_ehr)
    assert 0 < len(rows) < 50
    assert np.array_equal(got["test_paired"].time, inputs["test"].time[rows])
    assert np.array_equal(got["test_paired"].img_tokens, inputs["test"].img_tokens[rows])
    assert got["test_paired"].has_image.all() and got["test_paired"].has_ehr.all()
    assert np.array_equal(got_raw["test_paired"][:, 0], rows)  # the raw row of the same sample
    assert got["test"] is inputs["test"] and "test_paired" not in inputs
    assert survival.with_paired(inputs, None, ("test",))[1] is None
    inputs["test"].has_image[:] = False  # an EHR table: nothing to pair, no empty split
    assert set(survival.with_paired(inputs, raw, ("test",))[0]) == {"train", "test"}


def test_a_split_without_ehr_gets_a_note_from_the_raw_cox_model_not_a_crash():
    rng = np.random.default_rng(10)
    splits = {"train": _problem(300, rng), "test": _problem(100, rng)}
    splits["test"].has_ehr[:] = False
    raw = {k: v.ehr_pooled.astype(float) for k, v in splits.items()}
    res = evaluate_survival(
        splits, raw=raw, strategies=("image",), report_splits=("test",), bootstrap=0, epochs=20
    )
    assert res["cindex"]["raw_ehr_cox"]["test"] == {"note": "no samples with EHR and follow-up"}
    assert res["counts"]["raw_ehr_cox"]["test"]["excluded_no_ehr"] == 100
    assert 0 <= res["cindex"]["image"]["test"]["harrell"] <= 1


def test_head_seeds_score_each_head_by_the_mean_risk_of_that_many_fits():
    """head_seeds=3: the image head's risk is the mean of three fits from seeds 4, 5 and 6, each
    what a single fit from that seed gives; late fusion is fit once, on those mean risks."""
    rng = np.random.default_rng(11)
    splits = {"train": _problem(300, rng), "val": _problem(80, rng), "test": _problem(150, rng)}
    res = evaluate_survival(
        splits, strategies=("image", "ehr", "late_fusion"), report_splits=("test",), bootstrap=0, epochs=30,
        seed=4, head_seeds=3,
    )  # fmt: skip
    test, rows = splits["test"], np.arange(150)
    single = [
        survival._Strategy("image", splits["train"], splits["val"], 30, s).risk(test, rows) for s in (4, 5, 6)
    ]
    assert not np.allclose(single[0], single[1])  # the seeds differ, so the mean is not one fit
    expected = harrell(test.time, test.event, np.mean(single, axis=0))
    assert res["cindex"]["image"]["test"]["harrell"] == pytest.approx(expected, abs=1e-9)
    one = evaluate_survival(
        splits, strategies=("image",), report_splits=("test",), bootstrap=0, epochs=30, seed=4
    )
    assert one["cindex"]["image"]["test"]["harrell"] == pytest.approx(
        harrell(test.time, test.event, single[0]), abs=1e-9
    )
    assert res["cindex"]["late_fusion"]["test"]["harrell"] > res["cindex"]["image"]["test"]["harrell"]
    with pytest.raises(ValueError, match="head_seeds must be at least 1, got 0"):
        evaluate_survival(splits, report_splits=("test",), head_seeds=0)


def _raw_of(d: FusionInputs, rng) -> np.ndarray:
    """Raw EHR features of a `_problem` split: its EHR half of the log-hazard read back from the
    EHR tokens' direction, with noise, and a noise column; NaN rows without EHR."""
    b = (d.ehr_tokens * EHR_DIRECTION).sum((1, 2)) / (EHR_DIRECTION**2).sum()
    x = np.stack([b + 0.3 * rng.standard_normal(len(b)), rng.standard_normal(len(b))], 1)
    x[~d.has_ehr] = np.nan
    return x


def test_the_image_head_fused_with_the_raw_ehr_cox_model_beats_both():
    """image_with_raw_ehr: late fusion of the image head and the classical Cox model on the raw EHR
    features. Each carries half of the hazard, so together they order the test split better than
    either; samples missing a modality are scored too. Under a prefix (another encoder) the fused
    strategy is reported with it and the classical model, which reads no encoder, is not."""
    rng = np.random.default_rng(12)
    splits = {
        "train": _problem(600, rng, missing=0.2),
        "val": _problem(150, rng),
        "test": _problem(400, rng, missing=0.2),
    }
    raw = {k: _raw_of(d, rng) for k, d in splits.items()}
    res = evaluate_survival(
        splits, raw=raw, strategies=("image",), report_splits=("test",), bootstrap=0, epochs=60
    )
    c = {k: v["test"]["harrell"] for k, v in res["cindex"].items()}
    assert set(c) == {"image", "raw_ehr_cox", "image_with_raw_ehr"}
    assert c["image_with_raw_ehr"] > max(c["image"], c["raw_ehr_cox"]) + 0.03, c
    assert res["counts"]["image_with_raw_ehr"]["test"]["scored"] == 400
    assert res["counts"]["raw_ehr_cox"]["test"]["scored"] == int(splits["test"].has_ehr.sum()) < 400
    other = evaluate_survival(
        splits,
        raw=raw,
        strategies=("image",),
        report_splits=("test",),
        bootstrap=0,
        epochs=60,
        prefix="random_init:",
    )
    assert set(other["cindex"]) == {"random_init:image", "random_init:image_with_raw_ehr"}
    # no image head, no fusion with it: the classical model alone
    alone = evaluate_survival(
        splits, raw=raw, strategies=("ehr",), report_splits=("test",), bootstrap=0, epochs=20
    )
    assert set(alone["cindex"]) == {"ehr", "raw_ehr_cox"}


@pytest.mark.parametrize("stopping", ["val", "committee"])
def test_cross_fitting_scores_every_pooled_subject_once_by_heads_that_never_saw_it(monkeypatch, stopping):
    """cross_fitted: each subject of the pooled splits (with follow-up) in one fold, scored by heads
    fit and stopped on the other folds' subjects only (a committee's members too); the fused risk
    orders a problem whose hazard each modality carries half of better than either head; unscorable
    rows are NaN."""
    rng = np.random.default_rng(21)
    splits = {"train": _problem(260, rng, missing=0.2), "val": _problem(60, rng), "test": _problem(80, rng)}
    splits["test"].time[:5] = np.nan  # no follow-up: left out
    seen: list[tuple[set, set]] = []  # (times fit or stopped on, times scored) per fit
    real_init, real_risk = survival._Ensemble.__init__, survival._Ensemble.risk

    def init(self, name, fit, val, *a, **k):
        real_init(self, name, fit, val, *a, **k)
        self.seen = (set(fit.time) | (set(val.time) if val is not None else set()), set())
        seen.append(self.seen)

    def risk(self, d, rows):
        if len(d.time) == 395:  # the pooled subjects (late fusion also reads its parts' fit rows)
            self.seen[1].update(d.time[rows])
        return real_risk(self, d, rows)

    monkeypatch.setattr(survival._Ensemble, "__init__", init)
    monkeypatch.setattr(survival._Ensemble, "risk", risk)
    out = survival.cross_fitted(
        splits, folds=4, epochs=120, seed=0, stopping=stopping, head_seeds=2 if stopping == "committee" else 1
    )
    n = 260 + 60 + 75
    assert len(out["time"]) == n and sorted(np.bincount(out["fold"])) == [98, 99, 99, 99]
    for o, r, t in zip(out["origin"], out["row"], out["time"], strict=True):
        assert splits[o].time[r] == t  # origin and row lead back to the subject
    assert len(seen) == 4 * 3
    for fitted_on, scored in seen:
        assert scored and not (fitted_on & scored)
    last = out["fold"] == 3
    assert not (fitted_on & set(out["time"][last])) and len(fitted_on) == n - last.sum()
    image, ehr, fused = (out["risks"][k] for k in ("image", "ehr", "late_fusion"))
    paired = out["paired"]
    no_image = ~np.array([splits[o].has_image[r] for o, r in zip(out["origin"], out["row"], strict=True)])
    assert no_image.any() and np.isnan(image[no_image]).all()
    assert np.isfinite(fused).all() and np.isfinite(image[paired]).all() and np.isfinite(ehr[paired]).all()
    t, e, f = out["time"][paired], out["event"][paired], out["fold"][paired]
    d_img = survival.paired_cindex(t, e, fused[paired], image[paired], 200, 0, strata=f)
    d_ehr = survival.paired_cindex(t, e, fused[paired], ehr[paired], 200, 0, strata=f)
    assert 0.6 < d_img["b"] < d_img["a"] and 0.6 < d_ehr["b"] < d_ehr["a"]
    assert d_img["beyond_noise"] and d_ehr["beyond_noise"]


def test_cross_fitting_scores_the_raw_ehr_cox_model_and_the_image_head_fused_with_it(monkeypatch):
    """cross_fitted(raw=...): each fold is also scored by the classical Cox model on the raw EHR
    features, fit on the other folds' subjects only (those with EHR), and by the image head fused
    with it; the fusion orders a problem whose hazard each carries half of better than the raw
    model, pairs counted within a fold; a split without its raw features is refused by name."""
    rng = np.random.default_rng(23)
    splits = {"train": _problem(260, rng, missing=0.2), "val": _problem(60, rng), "test": _problem(80, rng)}
    raw = {k: _raw_of(d, rng) for k, d in splits.items()}
    fits: list[set] = []
    real = survival.RidgeCox.__init__

    def init(self, x, time, event, *a, **k):
        fits.append(set(time))
        real(self, x, time, event, *a, **k)

    monkeypatch.setattr(survival.RidgeCox, "__init__", init)
    out = survival.cross_fitted(splits, folds=4, epochs=120, seed=0, raw=raw)
    assert len(fits) == 4
    for k, fitted_on in enumerate(fits):
        assert not fitted_on & set(out["time"][out["fold"] == k])
    has_ehr = np.concatenate([splits[k].has_ehr for k in ("train", "val", "test")])
    base, fused = out["risks"]["raw_ehr_cox"], out["risks"]["image_with_raw_ehr"]
    assert (~has_ehr).any() and np.isnan(base[~has_ehr]).all() and np.isfinite(base[has_ehr]).all()
    assert np.isfinite(fused).all()
    p = out["paired"]
    d = survival.paired_cindex(
        out["time"][p], out["event"][p], fused[p], base[p], 200, 0, strata=out["fold"][p]
    )
    assert d["b"] > 0.6 and d["beyond_noise"] and d["difference"] > 0.03, d
    without_image = survival.cross_fitted(splits, folds=4, epochs=20, strategies=("ehr",), raw=raw)
    assert set(without_image["risks"]) == {"ehr", "raw_ehr_cox"}
    with pytest.raises(ValueError, match=r"raw EHR features of \['val'\] are missing"):
        survival.cross_fitted(splits, folds=4, raw={k: raw[k] for k in ("train", "test")})


def test_cross_fitting_names_what_it_cannot_do():
    rng = np.random.default_rng(2)
    splits = {"train": _problem(40, rng), "val": _problem(10, rng)}
    with pytest.raises(ValueError, match="at least 2 folds"):
        survival.cross_fitted(splits, pool=("train", "val"), folds=1)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 0.5\)"):
        survival.cross_fitted(splits, pool=("train", "val"), val_fraction=0.9)
    with pytest.raises(ValueError, match=r"no \['test'\] split"):
        survival.cross_fitted(splits)
    with pytest.raises(ValueError, match="too few for 30 folds"):
        survival.cross_fitted(splits, pool=("train", "val"), folds=30)
    with pytest.raises(ValueError, match="a committee needs at least 2 members"):
        survival.cross_fitted(splits, pool=("train", "val"), stopping="committee")
    with pytest.raises(ValueError, match="stopping must be one of"):
        survival.cross_fitted(splits, pool=("train", "val"), stopping="test")


def test_committee_parts_deal_every_subject_once_and_the_events_evenly():
    event = np.random.default_rng(3).random(103) < 0.3
    part = survival.committee_parts(event, 5, seed=7)
    assert sorted(np.unique(part)) == [0, 1, 2, 3, 4]
    assert np.ptp(np.bincount(part)) <= 1 and np.ptp(np.bincount(part[event])) <= 1
    assert np.array_equal(part, survival.committee_parts(event, 5, seed=7))
    assert not np.array_equal(part, survival.committee_parts(event, 5, seed=8))


def test_a_committee_stops_each_member_on_its_own_part_of_train_and_val(monkeypatch):
    """stopping="committee": the heads and the raw-EHR Cox model learn from train and val together;
    member i of each head is fit on all but part i and stopped on part i, so every subject the head
    scores is stopped on once and never by a member fit on it; the heads still read the planted
    hazard; too few events to give every member one is a note."""
    rng = np.random.default_rng(31)
    splits = {"train": _problem(240, rng, missing=0.2), "val": _problem(60, rng), "test": _problem(300, rng)}
    raw = {k: _raw_of(d, rng) for k, d in splits.items()}
    members: dict[str, list] = {}
    real_init = survival._Strategy.__init__

    def init(self, name, fit, val, *a, **k):
        real_init(self, name, fit, val, *a, **k)
        members.setdefault(name, []).append((fit, val))

    ridge_rows = []
    real_ridge = survival.RidgeCox.__init__

    def ridge(self, x, *a, **k):
        ridge_rows.append(len(x))
        real_ridge(self, x, *a, **k)

    monkeypatch.setattr(survival._Strategy, "__init__", init)
    monkeypatch.setattr(survival.RidgeCox, "__init__", ridge)
    res = evaluate_survival(
        splits, raw=raw, strategies=("image", "ehr", "late_fusion"), report_splits=("test",), bootstrap=0,
        epochs=80, head_seeds=3, stopping="committee",
    )  # fmt: skip
    learnt = set(splits["train"].time) | set(splits["val"].time)
    for name in ("image", "ehr"):
        assert len(members[name]) == 3
        stopped = [set(v.time) for _, v in members[name]]
        for fit, val in members[name]:
            assert not set(fit.time) & set(val.time) and set(fit.time) | set(val.time) == learnt
        has = {
            t
            for d in (splits["train"], splits["val"])
            for t, h in zip(d.time, d.has_image if name == "image" else d.has_ehr, strict=True)
            if h
        }  # the subjects this head scores, each stopped on by one member
        assert set().union(*stopped) == has and sum(map(len, stopped)) == len(has) < len(learnt)
    assert [v for _, v in members["late_fusion"]] == [None]  # one exact fit on the pooled subjects
    assert ridge_rows == [int(splits["train"].has_ehr.sum() + splits["val"].has_ehr.sum())]
    c = {k: v["test"]["harrell"] for k, v in res["cindex"].items()}
    assert min(c["image"], c["ehr"]) > 0.62 and c["late_fusion"] > max(c["image"], c["ehr"]), c
    # one event to deal: no member of a committee left without one to fit on, a note instead
    few = {k: d.take(np.arange(40)) for k, d in splits.items()}
    few["train"].event[:] = False
    few["val"].event[:] = False
    few["train"].event[np.flatnonzero(few["train"].has_ehr)[0]] = True
    res = evaluate_survival(
        few,
        strategies=("ehr", "late_fusion"),
        report_splits=("test",),
        epochs=5,
        head_seeds=2,
        stopping="committee",
    )
    assert "fewer than 2 events" in res["cindex"]["ehr"]["test"]["note"]
    assert "fewer than 2 events" in res["cindex"]["late_fusion"]["test"]["note"]
    with pytest.raises(ValueError, match="a committee needs at least 2 members"):
        evaluate_survival(splits, strategies=("ehr",), report_splits=("test",), stopping="committee")
    with pytest.raises(ValueError, match="stopping must be one of"):
        evaluate_survival(splits, strategies=("ehr",), report_splits=("test",), stopping="early")
