"""Few-label read-outs: the labelled draws, a planted signal read through a fraction of the labels,
pairing (the same rows and draws for every encoder, whatever order its embeddings come in), tasks
the data cannot support, and the config's guard on the fractions."""

from __future__ import annotations

import numpy as np
import pytest

from jepa_ray.config import load_config
from jepa_ray.errors import ConfigError
from jepa_ray.eval.fewlabel import MIN_EVENTS, MIN_LABELLED, few_label_reads, labelled_rows, tasks_of
from jepa_ray.eval.report import few_labels, report_markdown
from jepa_ray.eval.samples import Split


def test_labelled_rows_take_the_fraction_at_least_the_minimum_and_enough_events():
    drawn = np.random.default_rng(0).permutation(1000)
    event = np.zeros(1000, bool)
    event[::10] = True  # 10% events
    rows = labelled_rows(drawn, event, 0.1)
    assert len(rows) == 100 and set(rows) == set(drawn[:100]) and np.all(np.diff(rows) > 0)
    every = np.ones(1000, bool)
    assert len(labelled_rows(drawn, every, 0.001)) == MIN_LABELLED  # never fewer than the minimum
    rare = np.zeros(1000, bool)
    rare[drawn[500:503]] = True  # three events, all late in the draw
    rare[drawn[900:920]] = True
    got = labelled_rows(drawn, rare, 0.05)
    assert rare[got].sum() == MIN_EVENTS and set(drawn[:50]) <= set(got)  # extended to bring in events
    # a binary label needs both classes: almost every row positive, so negatives are brought in
    common = ~rare
    got = labelled_rows(drawn, common, 0.05, both=True)
    assert (~common[got]).sum() == MIN_EVENTS and common[got].sum() >= 50 - MIN_EVENTS


def _split(n: int, rng, keys: np.ndarray, offset: int) -> dict:
    """Meta of n subjects whose hazard and label follow a latent u (returned beside it)."""
    u = rng.normal(size=n)
    time = rng.exponential(np.exp(-1.5 * u)) * 365 + 1
    censor = rng.uniform(0, 3, n) * 365
    event = time < censor
    label = (u + rng.normal(scale=0.5, size=n) > 0).astype(int)
    meta = [
        {
            "subject": f"s{offset + i}",
            "tte": {"death": {"days": float(min(time[i], censor[i])), "event": bool(event[i])}},
            "labels": {"finding": int(label[i])},
        }
        for i in range(n)
    ]
    return {"u": u, "meta": meta, "keys": keys}


def _tables(n_fit: int = 400, n_test: int = 300, seed: int = 0):
    """'pretrained' holds u (plus noise dims), 'random_init' only noise, 'copy' the pretrained
    embeddings in a shuffled sample order."""
    rng = np.random.default_rng(seed)
    tables: dict[str, dict[str, Split]] = {"pretrained": {}, "random_init": {}, "copy": {}}
    z = {}
    for split, n, offset in (("train", n_fit, 0), ("test", n_test, 10_000)):
        d = _split(n, rng, np.arange(offset, offset + n), offset)
        for m, u in zip(d["meta"], d["u"], strict=True):
            z[m["subject"]] = np.array([u, rng.normal()])
        noise = rng.normal(size=(n, 8))
        good = np.concatenate([d["u"][:, None] + 0.3 * rng.normal(size=(n, 1)), noise[:, :7]], 1)

        def cols(emb, order, d=d, n=n):
            return {
                "key": d["keys"][order],
                "has_image": np.ones(n, bool),
                "has_ehr": np.ones(n, bool),
                "emb_image": emb[order].astype(np.float32),
                "emb_ehr": emb[order].astype(np.float32),
            }

        same = np.arange(n)
        shuffled = rng.permutation(n)
        tables["pretrained"][split] = Split(cols(good, same), d["meta"], 0)
        tables["random_init"][split] = Split(cols(noise, same), d["meta"], 0)
        tables["copy"][split] = Split(cols(good, shuffled), [d["meta"][i] for i in shuffled], 0)
    raw = {s: t.cols["emb_ehr"][:, :1].astype(float) for s, t in tables["pretrained"].items()}
    return tables, raw, z


def test_a_planted_signal_reads_through_a_fraction_of_the_labels_paired_on_the_same_rows():
    tables, raw, z = _tables()
    tasks = tasks_of(tables["pretrained"], "death", ["finding"], ("u", "noise"), z)
    assert set(tasks) == {"c-index death", "AUROC finding", "R² u", "R² noise"}
    groups = {"random_starts_mean": ["random_init", "copy"], "alone": ["random_init"]}
    out = few_label_reads(
        tables, raw, tasks, "train", ["test"], [0.1, 0.5], draws=3, bootstrap=100, seed=0, groups=groups
    )
    surv = out["tasks"]["c-index death"]["ehr"]
    assert surv["0.1"]["labelled"] >= 40 and surv["0.5"]["labelled"] == 200 and surv["0.1"]["of"] == 400
    for fraction in ("0.1", "0.5"):
        r = surv[fraction]
        pre, rnd = r["scores"]["pretrained"]["test"], r["scores"]["random_init"]["test"]
        assert len(pre["draws"]) == 3 and pre["mean"] == pytest.approx(np.mean(pre["draws"]), abs=1e-4)
        assert pre["mean"] > 0.7 and 0.4 < rnd["mean"] < 0.6  # the signal, and noise
        d = r["versus"]["random_init"]["test"]
        assert d["beyond_noise"] and d["ci95"][0] > 0 and d["difference"] == pytest.approx(d["a"] - d["b"])
        # the same embeddings in another sample order: the same rows, draws and predictions
        same = r["versus"]["copy"]["test"]
        assert same["difference"] == pytest.approx(0, abs=1e-9) and not same["beyond_noise"]
        # several encoders compared as one (every random start): by their mean score; a group of one
        # is that encoder's own row already
        mean = r["versus"]["random_starts_mean"]["test"]
        assert mean["of"] == 2 and mean["b"] == pytest.approx((d["b"] + same["b"]) / 2)
        assert mean["a"] == d["a"] and "alone" not in r["versus"]
        # the raw-EHR Cox on the EHR input, fit on the same rows (here the signal column itself)
        assert r["scores"]["raw_ehr_cox"]["test"]["mean"] > 0.7
    assert "raw_ehr_cox" not in out["tasks"]["c-index death"]["image"]["0.1"]["scores"]
    auc = out["tasks"]["AUROC finding"]["image"]["0.1"]["versus"]["random_init"]["test"]
    assert auc["a"] > 0.8 and auc["beyond_noise"]
    r2 = out["tasks"]["R² u"]["image"]["0.1"]["versus"]["random_init"]["test"]
    assert r2["a"] > 0.7 and r2["b"] < 0.1 and r2["beyond_noise"]
    assert set(out["tasks"]["R² noise"]) == {"image"}  # latent factors are read from the image

    header, rows = few_labels({"few_labels": out})
    assert header[0] == "task" and any(
        r[:4] == ["c-index death", "ehr", "10%: 40 of 400", "test"] for r in rows
    )
    assert any("better" in r[-1] and r[5] == "random init" for r in rows)
    assert any(r[5] == "mean of 2 random starts" for r in rows)
    assert "## Few labels" in report_markdown({"few_labels": out})


def test_tasks_the_data_cannot_support_are_noted_not_fit():
    tables, raw, _ = _tables(n_fit=20, n_test=60)  # 20 labelled subjects: below the minimum
    out = few_label_reads(tables, raw, tasks_of(tables["pretrained"], "death", [], (), None), "train", ["test"],
                          [0.5], draws=2, bootstrap=10, seed=0)  # fmt: skip
    note = out["tasks"]["c-index death"]["ehr"]["note"]
    assert "20 labelled subjects" in note and "train" in note and str(MIN_LABELLED) in note
    # an EHR-only table: the image input is skipped, not reported as missing
    tables2, raw2, _ = _tables(n_fit=200, n_test=100)
    for t in tables2.values():
        for s in t.values():
            s.cols["has_image"] = np.zeros(len(s), bool)
    out = few_label_reads(tables2, raw2, tasks_of(tables2["pretrained"], "death", [], (), None), "train",
                          ["test"], [0.2], draws=1, bootstrap=0, seed=0)  # fmt: skip
    assert set(out["tasks"]["c-index death"]) == {"ehr"}
    d = out["tasks"]["c-index death"]["ehr"]["0.2"]["versus"]["random_init"]["test"]
    assert d["ci95"] is None and d["beyond_noise"] is None  # bootstrap off


def test_a_read_out_that_cannot_be_fit_is_noted_and_the_rest_goes_on(monkeypatch):
    from jepa_ray.eval import fewlabel

    tables, raw, _ = _tables(n_fit=200, n_test=100)
    fit = fewlabel._fit

    def failing(kind, x, y):
        if kind == "survival" and len(x) < 50:  # the 10% draws (24 rows) fail, the half ones fit
            raise ArithmeticError("the Cox fit did not converge")
        return fit(kind, x, y)

    monkeypatch.setattr(fewlabel, "_fit", failing)
    tasks = tasks_of(tables["pretrained"], "death", ["finding"], (), None)
    out = few_label_reads(tables, raw, tasks, "train", ["test"], [0.1, 0.5], draws=2, bootstrap=0, seed=0)
    surv = out["tasks"]["c-index death"]["ehr"]
    assert "did not converge" in surv["0.1"]["note"] and "24 labelled subjects" in surv["0.1"]["note"]
    assert surv["0.5"]["labelled"] == 100 and "versus" in surv["0.5"]  # the other fraction is read
    assert "versus" in out["tasks"]["AUROC finding"]["ehr"]["0.1"]  # and the other task
    rows = few_labels({"few_labels": out})[1]
    assert any(r[2] == "10%" and "did not converge" in r[4] for r in rows)


@pytest.mark.parametrize("bad", ["[0.0]", "[1.0]", "[0.1, 1.5]", "[-0.2]"])
def test_fractions_outside_zero_one_are_refused_naming_the_setting(bad):
    with pytest.raises(ConfigError, match=r"eval\.label_fractions.*strictly between 0 and 1"):
        load_config(overrides=[f"eval.label_fractions={bad}"])
    with pytest.raises(ConfigError, match=r"eval\.label_draws"):
        load_config(overrides=["eval.label_draws=0"])
    assert load_config(overrides=["eval.label_fractions=[0.2, 0.05, 0.2]"]).eval.label_fractions == [
        0.05,
        0.2,
    ]
