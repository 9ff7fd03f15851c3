"""`jepa-ray evaluate` end to end on a synthetic cohort with a held-out site: embeddings through a
Ray Data actor pool, probes, latent R², retrieval, survival heads, report files; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from shardkit import raw_samples, train_in_memory

from jepa_ray.config import ModelConfig, load_config
from jepa_ray.errors import ConfigError
from jepa_ray.eval.evaluate import evaluate
from jepa_ray.eval.fewlabel import MIN_LABELLED
from jepa_ray.model.io import save_jepa
from jepa_ray.model.jepa import JEPA
from jepa_ray.stream.pipeline import open_split

PIPELINE = ["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=12"]
EVAL = [
    "eval.bootstrap=20",
    "eval.survival_epochs=20",
    "eval.survival_head_seeds=2",
    "eval.attentive_epochs=8",
    "eval.batch_size=32",
    "eval.segmentation_steps=40",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, ray_session):
    """120 subjects at 3 sites, one of them held out: (cohort dir, shards dir)."""
    from jepa_ray.config import SynthConfig
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.synth.cohort import cohort_inputs, write_cohort

    root = tmp_path_factory.mktemp("evalcohort")
    write_cohort(root / "cohort", SynthConfig(subjects=120, seed=11, sites=3, min_size=96, max_size=128))
    cfg = load_config(
        overrides=[
            "prepare.image.size=32",
            "prepare.shards.max_samples=32",
            'prepare.split.external_sites=["Quenby Lakes General Hospital"]',
        ]
    ).prepare
    assert prepare(
        str(root / "shards"), cfg, **cohort_inputs(root / "cohort"), masks=str(root / "cohort" / "masks")
    ).ok
    return root / "cohort", root / "shards"


def _trained(cohort, tmp_path_factory, objective: str):
    """A tiny model trained in-process on the train split, saved in the export format."""
    split = open_split(str(cohort[1]), "train")
    cfg = load_config(overrides=PIPELINE)
    samples = {}
    for p in split.paths:
        samples.update(raw_samples(p))
    torch.manual_seed(0)
    model = JEPA(
        split.spec.model_dims(cfg.pipeline), ModelConfig(width=64, depth=2, heads=4, objective=objective)
    )
    train_in_memory(model, samples, split.spec, cfg.pipeline, steps=60)
    pipeline = {
        k: getattr(cfg.pipeline, k)
        for k in ("image_size", "patch_size", "normalize", "max_events", "max_static_codes")
    }
    return save_jepa(model, tmp_path_factory.mktemp("enc") / f"{objective}.safetensors", pipeline, step=60)


@pytest.fixture(scope="module")
def encoder(cohort, tmp_path_factory):
    """A tiny JEPA trained in-process on the train split, saved in the export format."""
    return _trained(cohort, tmp_path_factory, "jepa")


@pytest.fixture(scope="module")
def mae(cohort, tmp_path_factory):
    """The reconstruction baseline, trained the same way."""
    return _trained(cohort, tmp_path_factory, "mae")


def test_evaluate_writes_every_metric_the_report_and_the_plots(cohort, encoder, mae, tmp_path, ray_session):
    cohort_dir, shards = cohort
    few = ["eval.label_fractions=[0.4]", "eval.label_draws=2"]
    # the survival heads as committees (members stopped on parts of train and val; the other tests and
    # the real-table benchmark's run stop them on the val split)
    cfg = load_config(overrides=[*PIPELINE, *EVAL, *few, "eval.survival_stopping=committee"])
    out = tmp_path / "eval"
    m = evaluate(
        str(encoder), str(shards), cfg, out, latents=str(cohort_dir / "latents.parquet"), baselines=[str(mae)]
    )

    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"cindex", "probe", "retrieval", "latent_r2", "counts"}
    assert saved["encoder"]["read"] == "target"  # eval.encoder=auto on data with images
    assert all((out / p).stat().st_size > 5000 for p in ("cindex.png", "probe.png", "retrieval.png"))
    report = (out / "report.md").read_text()
    assert "co_attention" in report and "external" in report and "random_init" in report
    assert saved["survival"]["heads"] == {"stopping": "committee", "fits": 2, "steps": 20}
    assert "committees of 2 members" in report

    # one sample per subject, every subject of the cohort in exactly one split
    subjects = pd.read_parquet(cohort_dir / "latents.parquet")
    assert sum(c["subjects"] for c in m["counts"].values()) == len(subjects)
    # the held-out site's imaged subjects (EHR-only subjects have no site)
    assert m["counts"]["external"]["subjects"] == int(((subjects["site"] == 2) & subjects["has_image"]).sum())

    strategies = (
        "image",
        "ehr",
        "late_fusion",
        "contrastive",
        "cross_attention",
        "co_attention",
        "image_with_raw_ehr",
    )
    for strategy in strategies:
        for name in (strategy, f"random_init:{strategy}"):
            for split in ("test", "external"):
                r = m["cindex"][name][split]
                assert 0 <= r["harrell"] <= 1 and 0 <= r["uno"] <= 1
                lo, hi = r["ci95"]["harrell"]
                assert lo <= r["harrell"] <= hi
    assert 0 <= m["cindex"]["raw_ehr_cox"]["test"]["harrell"] <= 1
    # again on the subjects with both modalities: every strategy scores the same subjects
    for split in ("test", "external"):
        paired = {
            s: m["cindex"][s][f"{split}_paired"]
            for s in ("image", "ehr", "late_fusion", "raw_ehr_cox", "image_with_raw_ehr")
        }
        assert len({r["n"] for r in paired.values()}) == 1, paired
        assert 0 < paired["image"]["n"] <= m["counts"][split]["both"]
        assert paired["late_fusion"]["n"] <= m["cindex"]["late_fusion"][split]["n"]
    assert m["cindex"]["late_fusion"]["test_paired"]["n"] < m["cindex"]["late_fusion"]["test"]["n"]

    probe = m["probe"]["pretrained"]["joint"]["cardiomegaly"]["linear"]["test"]
    assert 0 <= probe["auroc"] <= 1 and probe["n"] <= m["counts"]["test"]["subjects"]
    excluded = m["probe"]["pretrained"]["image"]["cardiomegaly"]["excluded"]["test"]
    no_image = m["counts"]["test"]["subjects"] - m["counts"]["test"]["with_image"]
    assert excluded >= no_image  # samples without an image are counted out of the image probe

    r = m["retrieval"]["pretrained"]["external"]["image_to_ehr"]
    assert r["n"] == m["counts"]["external"]["both"] and r["chance@5"] == pytest.approx(5 / r["n"])
    linear = m["retrieval"]["pretrained"]["external"]["image_to_ehr_linear"]  # a ridge map fit on train
    assert linear["n"] == r["n"] and 0 <= linear["recall@5"] <= 1
    assert "image_to_ehr_linear" in (out / "report.md").read_text()
    assert list(m["latent_r2"]["pretrained"]["test"]["r2"]) == ["cardiac", "lung", "frailty", "mass"]
    assert "| n | cardiac | lung | frailty | mass |" in (out / "report.md").read_text()

    # the attentive probe on the image tokens, beside the linear one (eval.attentive is on by default)
    image = m["probe"]["pretrained"]["image"]["cardiomegaly"]
    for split in ("test", "external"):
        att, lin = image["attentive"][split], image["linear"][split]
        assert 0 <= att["auroc"] <= 1 and att["n"] == lin["n"] and att["positives"] == lin["positives"]
    assert "attentive" not in m["probe"]["pretrained"]["joint"]["cardiomegaly"]  # image tokens only
    for name in ("pretrained", "random_init"):
        r = m["latent_r2_attentive"][name]["test"]
        assert r["n"] == m["latent_r2"][name]["test"]["n"] and 1 <= r["epochs"] <= 8
        assert set(r["r2"]) == {"cardiac", "lung", "frailty", "mass"} and all(
            -5 < v <= 1 for v in r["r2"].values()
        )
    assert "| attentive | test |" in report and "| image | cardiomegaly | attentive |" in report

    # the segmentation heads on frozen patch tokens (the shards carry the phantoms' masks)
    for name in ("pretrained", "random_init", "mae"):
        for head in ("linear", "conv"):
            for split in ("test", "external"):
                row = m["segmentation"][name][head][split]
                assert set(row) >= {"heart", "right_lung", "left_upper", "mean"}
                for v in row.values():
                    assert 0 <= v["ci"][0] <= v["dice"] <= v["ci"][1] <= 1
    lung = m["segmentation"]["pretrained"]["conv"]["test"]["right_lung"]["dice"]
    assert lung > 0.5  # the lung fields are large and where the tokens' positions say
    assert (
        "## Segmentation from frozen patch tokens" in report
        and "| pretrained | conv | test | heart |" in report
    )

    # the MAE baseline goes through every evaluation, and the pretrained encoder is compared with
    # each other one on the same samples (paired differences with their intervals)
    assert m["encoders"] == ["pretrained", "random_init", "mae"]
    assert 0 <= m["cindex"]["mae:co_attention"]["test"]["harrell"] <= 1 and "mae" in m["latent_r2_attentive"]
    for other in ("random_init", "mae"):
        d = m["comparison"][other]["latent R² cardiac"]["linear"]["test"]
        # the same ridge on the same samples as the latent R² table: a and b are those numbers
        assert d["a"] == pytest.approx(m["latent_r2"]["pretrained"]["test"]["r2"]["cardiac"])
        assert d["b"] == pytest.approx(m["latent_r2"][other]["test"]["r2"]["cardiac"])
        lo, hi = d["ci95"]
        assert lo <= d["difference"] <= hi and d["beyond_noise"] == (lo > 0 or hi < 0)
        auc = m["comparison"][other]["AUROC cardiomegaly"]["attentive"]["external"]
        assert auc["n"] == m["probe"]["pretrained"]["image"]["cardiomegaly"]["attentive"]["external"]["n"]
        # the attentive probes compared are those of the probe and latent R² tables, not refits
        probe_auc = m["probe"][other]["image"]["cardiomegaly"]["attentive"]["external"]["auroc"]
        assert auc["b"] == pytest.approx(probe_auc)
        att = m["comparison"][other]["latent R² mass"]["attentive"]["test"]
        assert att["a"] == pytest.approx(m["latent_r2_attentive"]["pretrained"]["test"]["r2"]["mass"])
        assert att["b"] == pytest.approx(m["latent_r2_attentive"][other]["test"]["r2"]["mass"])
        # out of fold: every imaged subject of train, val, test and external scored once, the a and
        # b of the paired difference those encoders' out-of-fold R²
        cv = m["comparison"][other]["latent R² lung"]["attentive"]["out-of-fold"]
        assert cv["n"] == m["latent_r2_cv"]["pretrained"]["n"] > m["latent_r2"]["pretrained"]["test"]["n"]
        assert cv["a"] == pytest.approx(m["latent_r2_cv"]["pretrained"]["attentive"]["lung"])
        assert cv["b"] == pytest.approx(m["latent_r2_cv"][other]["attentive"]["lung"])
        # each encoder's out-of-fold R² has its interval too
        oof = m["latent_r2_cv"][other]
        for probe in ("linear", "grid", "attentive"):
            for factor, (lo, hi) in oof["ci95"][probe].items():
                assert lo < hi and lo - 0.05 <= oof[probe][factor] <= hi + 0.05
        # the grid read-out (ridge on the 16 tokens in grid order), paired on the same predictions
        assert list(oof["grid"]) == ["cardiac", "lung", "frailty", "mass"]
        grid = m["comparison"][other]["latent R² frailty"]["grid"]["out-of-fold"]
        assert grid["n"] == cv["n"] and grid["a"] == pytest.approx(
            m["latent_r2_cv"]["pretrained"]["grid"]["frailty"]
        )
        assert grid["b"] == pytest.approx(oof["grid"]["frailty"]) and grid["difference"] == pytest.approx(
            grid["a"] - grid["b"]
        )
        # the time-to-event heads, strategy by strategy, on the samples both encoders scored: a and b
        # the c-indices of the c-index table, and the paired interval around their difference
        for strategy, split in (
            ("image", "test"),
            ("late_fusion", "external"),
            ("co_attention", "test"),
        ):
            c = m["comparison"][other]["c-index death"][strategy][split]
            assert c["a"] == pytest.approx(m["cindex"][strategy][split]["harrell"])
            assert c["b"] == pytest.approx(m["cindex"][f"{other}:{strategy}"][split]["harrell"])
            assert c["n"] == m["cindex"][strategy][split]["n"]
            lo, hi = c["ci95"]
            assert lo <= c["difference"] <= hi and c["beyond_noise"] == (lo > 0 or hi < 0)
        assert "raw_ehr_cox" not in m["comparison"][other]["c-index death"]  # it reads no encoder
        assert "test_paired" not in m["comparison"][other]["c-index death"]["late_fusion"]
    assert (
        "Pretrained against the other encoders" in report and "| latent R² lung, attentive, test |" in report
    )
    assert "| c-index death, late_fusion, external |" in report
    assert (
        "| latent R² lung, attentive, out-of-fold |" in report
        and "out-of-fold (train, val, test, external)" in report
    )
    cv_row = next(x for x in report.splitlines() if x.startswith("| pretrained | attentive | out-of-fold"))
    assert cv_row.count("[") == len(m["latent_r2_cv"]["pretrained"]["attentive"])  # one interval per factor
    grid_row = next(x for x in report.splitlines() if x.startswith("| mae | grid | out-of-fold"))
    grid_ci = saved["latent_r2_cv"]["mae"]["ci95"]["grid"]["cardiac"]
    assert (
        f"| {saved['latent_r2_cv']['mae']['grid']['cardiac']:.3f} [{grid_ci[0]:.3f}, {grid_ci[1]:.3f}] |"
        in grid_row
    )
    assert "| latent R² mass, grid, out-of-fold |" in report

    # the few-label read-outs: every encoder refit on the same 40% of the fit split's labels, paired
    few_labels = m["few_labels"]["tasks"]
    labels = list(m["probe"]["pretrained"]["joint"])
    factors = list(m["latent_r2"]["pretrained"]["test"]["r2"])
    assert set(few_labels) == {
        "c-index death",
        *(f"AUROC {x}" for x in labels),
        *(f"R² {f}" for f in factors),
    }
    surv = few_labels["c-index death"]["ehr"]["0.4"]
    assert MIN_LABELLED <= surv["labelled"] < surv["of"] and set(surv["versus"]) == {
        "random_init",
        "mae",
        "raw_ehr_cox",
    }
    for other, by_split in surv["versus"].items():
        for split in ("test", "external"):
            d = by_split[split]
            assert d["a"] == pytest.approx(surv["scores"]["pretrained"][split]["mean"])
            assert d["b"] == pytest.approx(surv["scores"][other][split]["mean"])
            assert d["ci95"][0] <= d["difference"] <= d["ci95"][1] and 0 <= d["a"] <= 1
    mass = few_labels["R² mass"]["image"]["0.4"]["scores"]
    assert set(mass) == {"pretrained", "random_init", "mae"} and len(mass["mae"]["test"]["draws"]) == 2
    assert "## Few labels" in report and "| c-index death | ehr | 40%: " in report

    # the command line, on the same output: cached embeddings reused, a one-screen summary
    from typer.testing import CliRunner

    from jepa_ray.cli import app

    stamp = (out / "embeddings" / "pretrained" / "test.parquet").stat().st_mtime_ns
    args = ["evaluate", "--encoder", str(encoder), "--data", str(shards), "--out", str(out)]
    args += ["--latents", str(cohort_dir / "latents.parquet")]
    result = CliRunner().invoke(app, [*args, *PIPELINE, *EVAL, *few, "eval.bootstrap=0"])
    assert result.exit_code == 0, result.output
    assert "co_attention" in result.output and "latent R² cardiac" in result.output
    assert "pretrained minus" in result.output and "no interval" in result.output  # eval.bootstrap=0
    assert (
        result.output.count("  attentive") == 4 and "image attentive" in result.output
    )  # beside ridge (one row per latent factor), linear
    assert "few labels" in result.output and "raw EHR Cox" in result.output
    assert (out / "embeddings" / "pretrained" / "test.parquet").stat().st_mtime_ns == stamp


def _token_tables(rng, carried: dict[str, float], tokens: int = 16, width: int = 8, n: int = 40):
    """({encoder: {split: Split}}, z): 3 x n subjects; each encoder's image tokens carry the one
    latent factor (frailty) at the given strength along a direction of each position's own that
    sums to zero over the grid (bone density over ribs and spine): the mean-pooled embedding
    carries none of it."""
    import numpy as np

    from jepa_ray.eval.samples import Split

    subjects = [f"s{i:03d}" for i in range(3 * n)]
    frailty = rng.standard_normal(len(subjects))
    z = {s: np.array([f]) for s, f in zip(subjects, frailty, strict=True)}
    tables = {}
    for name, strength in carried.items():
        w = rng.standard_normal((tokens, width))
        w -= w.mean(0)  # (T, D): pooled over positions, nothing left
        t = strength * frailty[:, None, None] * w + rng.standard_normal((len(subjects), tokens, width))
        tables[name] = {
            split: Split(
                cols={
                    "key": np.array(subjects[i * n : (i + 1) * n]),
                    "has_image": np.ones(n, bool),
                    "emb_image": t[i * n : (i + 1) * n].mean(1),
                    "img_tokens": t[i * n : (i + 1) * n].reshape(n, -1).astype(np.float16),
                },
                meta=[{"subject": s} for s in subjects[i * n : (i + 1) * n]],
                dropped_later_studies=0,
            )
            for i, split in enumerate(("train", "val", "test"))
        }
    return tables, z


def test_the_grid_read_out_finds_a_factor_spread_over_positions_that_pooling_misses():
    """`_latent_oof` on in-memory tables (no Ray): the grid read-out (ridge on the tokens in grid
    order) reads what the pooled ridge cannot, without the attentive probe, with its interval and
    paired differences; eval.grid=false leaves it out."""
    import numpy as np

    from jepa_ray.eval.evaluate import _latent_oof
    from jepa_ray.eval.report import report_markdown

    tables, z = _token_tables(np.random.default_rng(0), {"pretrained": 0.0, "random_init": 0.6})
    cfg = load_config(overrides=["eval.attentive=false", "eval.bootstrap=50"])
    r2, paired = _latent_oof(tables, ("frailty",), z, ["test"], cfg)
    for name in ("pretrained", "random_init"):
        assert list(r2[name]) == ["linear", "grid", "n", "splits", "ci95"] and r2[name]["n"] == 120
        assert r2[name]["linear"]["frailty"] < 0.1  # pooled: the spread factor is gone
    assert r2["random_init"]["grid"]["frailty"] > 0.5 > 0.1 > r2["pretrained"]["grid"]["frailty"]
    lo, hi = r2["random_init"]["ci95"]["grid"]["frailty"]
    assert lo <= r2["random_init"]["grid"]["frailty"] <= hi and lo > 0.3
    # the pretrained encoder lost it: worse beyond noise under grid, within noise under the pooled ridge
    d = paired["random_init"]["latent R² frailty"]["grid"]
    assert d["a"] == pytest.approx(r2["pretrained"]["grid"]["frailty"])
    assert d["b"] == pytest.approx(r2["random_init"]["grid"]["frailty"])
    assert d["difference"] < -0.4 and d["ci95"][1] < 0 and d["beyond_noise"]
    assert not paired["random_init"]["latent R² frailty"]["linear"]["beyond_noise"]
    # the report's out-of-fold rows: one per read-out, each value with its interval
    held_out = {"pretrained": {"test": {"r2": {"frailty": 0.0}, "n": 40}}}
    md = report_markdown({"latent_r2": held_out, "latent_r2_cv": r2})
    row = next(
        x for x in md.splitlines() if x.startswith("| random_init | grid | out-of-fold (train, val, test)")
    )
    assert row.endswith(f"| 120 | {r2['random_init']['grid']['frailty']:.3f} [{lo:.3f}, {hi:.3f}] |")
    off, _ = _latent_oof(
        tables, ("frailty",), z, ["test"], load_config(overrides=["eval.attentive=false", "eval.grid=false"])
    )
    assert "grid" not in off["pretrained"] and "grid" not in off["pretrained"]["ci95"]


def test_image_tokens_of_another_size_are_named_not_concatenated():
    import numpy as np

    from jepa_ray.eval.evaluate import _latent_oof, stack_tokens

    parts = {"train": np.zeros((5, 16, 8)), "test": np.zeros((3, 16, 8))}
    assert stack_tokens(parts, "pretrained").shape == (8, 16, 8)
    with pytest.raises(
        ValueError,
        match=r"mae: image token counts differ between splits \(train: 16 tokens of width 8, test: 4 tokens of width 8\)",
    ):
        stack_tokens({"train": np.zeros((5, 16, 8)), "test": np.zeros((3, 4, 8))}, "mae")
    # through the out-of-fold read-out: a test split embedded at another image size
    tables, z = _token_tables(np.random.default_rng(1), {"pretrained": 1.0})
    small, _ = _token_tables(np.random.default_rng(1), {"pretrained": 1.0}, tokens=4)
    tables["pretrained"]["test"] = small["pretrained"]["test"]
    with pytest.raises(ValueError, match="image token counts differ"):
        _latent_oof(tables, ("frailty",), z, ["test"], load_config(overrides=["eval.attentive=false"]))


def test_encoders_embedded_in_one_pass_get_what_each_gets_alone(cohort, encoder, mae, tmp_path, ray_session):
    """`evaluate` reads and transforms the data once for all its encoders; each one's embeddings
    are those it writes alone (up to float rounding in other batches), and a rerun embeds only
    what is not cached."""
    import numpy as np

    from jepa_ray.eval.embed import extract, extract_many, read_embeddings
    from jepa_ray.eval.evaluate import baseline_sources, resolve_encoder

    shards = str(cohort[1])
    cfg = load_config(overrides=[*PIPELINE, *EVAL])
    sources = [resolve_encoder(str(encoder), cfg, tmp_path), *baseline_sources([str(mae)], cfg, tmp_path)]
    together = extract_many(sources, shards, ["train", "test"], cfg, tmp_path / "together")
    assert sorted(together) == ["mae", "pretrained"] and all(
        sorted(p) == ["test", "train"] for p in together.values()
    )
    # the default (eval.encoder=auto) reads the EMA target on data with images
    assert cfg.eval.encoder == "auto" and all(
        json.loads(p.with_suffix(".json").read_text())["read"] == "target"
        for by in together.values()
        for p in by.values()
    )
    for source in sources:
        alone = read_embeddings(extract(source, shards, ["test"], cfg, tmp_path / "alone")["test"])
        both = read_embeddings(together[source.name]["test"])
        assert set(alone) == set(both) and len(alone["key"]) == len(both["key"]) > 0
        a, b = np.argsort(alone["key"]), np.argsort(both["key"])
        for col in ("emb_image", "emb_ehr", "img_tokens", "q_img2ehr"):
            np.testing.assert_allclose(both[col][b], alone[col][a], atol=1e-3, err_msg=f"{source.name} {col}")
    pretrained_emb = read_embeddings(together["pretrained"]["test"])["emb_image"]
    assert not np.allclose(pretrained_emb, read_embeddings(together["mae"]["test"])["emb_image"])
    # a rerun with one file gone embeds that one only
    stamps = {(n, s): p.stat().st_mtime_ns for n, by in together.items() for s, p in by.items()}
    together["mae"]["test"].unlink()
    again = extract_many(sources, shards, ["train", "test"], cfg, tmp_path / "together")
    assert again == together and again["mae"]["test"].exists()
    changed = {k for k, t in stamps.items() if again[k[0]][k[1]].stat().st_mtime_ns != t}
    assert changed == {("mae", "test")}
    # eval.encoder=context: the encoder the gradient trained is read instead of the EMA target; the
    # cached target reads are not taken for it. A trained JEPA's two encoders differ; an MAE export's
    # target encoder is its context encoder, so it reads the same either way
    tgt = {name: read_embeddings(together[name]["test"]) for name in ("pretrained", "mae")}
    context = load_config(overrides=[*PIPELINE, *EVAL, "eval.encoder=context"])
    read = extract_many(sources, shards, ["test"], context, tmp_path / "together")
    assert read["pretrained"]["test"].stat().st_mtime_ns != stamps[("pretrained", "test")]
    ctx = {name: read_embeddings(read[name]["test"]) for name in ("pretrained", "mae")}
    for name in ("pretrained", "mae"):
        assert list(ctx[name]["key"]) == list(tgt[name]["key"]), name
    for col in ("emb_image", "emb_ehr"):
        np.testing.assert_allclose(ctx["mae"][col], tgt["mae"][col], atol=1e-5, err_msg=col)
        assert np.abs(ctx["pretrained"][col] - tgt["pretrained"][col]).max() > 1e-3, col
    for name in ("pretrained", "mae"):  # the stamps say which encoder the cache holds now
        assert json.loads(read[name]["test"].with_suffix(".json").read_text())["read"] == "context"
    with pytest.raises(ConfigError, match=r"eval.encoder: Input should be .auto., .target. or .context."):
        load_config(overrides=["eval.encoder=online"])


def test_auto_reads_the_context_encoder_where_the_data_hold_no_image():
    from jepa_ray.eval.embed import read_encoder

    ehr_only = {"counts": {"samples": 500, "ehr": 500, "image": 0, "volume": 0}}
    assert read_encoder("auto", ehr_only) == "context"
    assert read_encoder("auto", {"counts": {"samples": 3}}) == "context"  # a manifest without image counts
    assert read_encoder("auto", {"counts": {"image": 0, "volume": 2}}) == "target"  # CT volumes are images
    assert read_encoder("auto", {"counts": {"image": 1, "volume": 0}}) == "target"
    for setting in ("target", "context"):  # an explicit setting is kept whatever the data
        assert read_encoder(setting, ehr_only) == setting
        assert read_encoder(setting, {"counts": {"image": 4}}) == setting
    with pytest.raises(ConfigError, match=r"eval.encoder: auto, target or context, not 'online'"):
        read_encoder("online", ehr_only)


def test_bad_inputs_are_named(cohort, encoder, tmp_path, ray_session):
    shards = cohort[1]
    cfg = load_config(overrides=[*PIPELINE, *EVAL, "eval.random_baseline=false"])
    with pytest.raises(ConfigError, match=r"missing.safetensors: no such exported encoder"):
        evaluate(str(tmp_path / "missing.safetensors"), str(shards), cfg, tmp_path / "a")
    bad = tmp_path / "latents.parquet"
    pd.DataFrame({"subject_id": [1], "cardiac": [0.0]}).to_parquet(bad)
    with pytest.raises(ConfigError, match=r"latents.parquet: missing column.*lung"):
        evaluate(str(encoder), str(shards), cfg, tmp_path / "b", latents=str(bad))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"junk.parquet: cannot read it as parquet"):
        evaluate(str(encoder), str(shards), cfg, tmp_path / "c", latents=str(tmp_path / "junk.parquet"))
    # an encoder trained on other shards: its EHR vocabulary differs
    info = json.loads(encoder.with_suffix(".json").read_text())
    info["dims"]["vocab_size"] += 5
    other = tmp_path / "other.safetensors"
    other.write_bytes(encoder.read_bytes())
    other.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"vocab_size .* the encoder was trained with"):
        evaluate(str(other), str(shards), cfg, tmp_path / "d")
    # latents of another cohort (or shards prepared with another salt; this one written before the
    # `mass` factor, which is optional): nothing joins
    strangers = tmp_path / "strangers.parquet"
    pd.DataFrame(
        {"subject_id": [1, 2], "cardiac": [0.0, 1], "lung": [0.0, 1], "frailty": [0.0, 1]}
    ).to_parquet(strangers)
    with pytest.raises(ConfigError, match="no subject matches the shards; is JEPA_RAY_SALT"):
        evaluate(str(encoder), str(shards), cfg, tmp_path / "e", latents=str(strangers))


def test_the_real_table_benchmark_runs_end_to_end(tmp_path, ray_session, monkeypatch):
    """`benchmarks/bench_real_ehr.py`'s own path on GBSG2 (bundled with scikit-survival), a few
    steps: the shards it prepares and the three c-index rows it compares. An evaluation change that
    breaks an EHR-only cohort fails here, not two days later in a benchmark rerun."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_real_ehr
    from bench_real_ehr import ROWS, run

    # the forest ceiling with 25 trees instead of 200: what is tested is that it is read on the
    # same folds and labelled rows, not how well (9 of the test's 10 s of forest fits)
    monkeypatch.setitem(bench_real_ehr.FOREST, "n_estimators", 25)
    doc = run(
        "gbsg2",
        tmp_path,
        [
            "eval.bootstrap=20",
            "eval.survival_epochs=60",
            "eval.survival_head_seeds=1",
            "eval.random_starts=2",
            "eval.label_fractions=[0.1]",
        ],
        steps=4,
        cv_alphas=(100.0,),
        cv_repeats=2,
        label_fractions=(0.2,),
    )
    assert doc["config"]["subjects"] == 686
    split = open_split(str(tmp_path / "shards"), "train")
    assert split.spec.num_names == ["age", "tsize", "pnodes"]
    assert sorted(split.spec.cat_names) == ["horTh", "menostat", "tgrade"]
    sample = next(iter(raw_samples(split.paths[0]).values()))
    meta = json.loads(sample["meta"])
    assert (
        "image" not in sample and set(meta["tte"]) == {"recurrence"} and meta["tte"]["recurrence"]["days"] > 0
    )
    rows = doc["results"]["test"]
    assert set(rows) == set(ROWS)
    n = rows["raw_ehr_cox"]["n"]
    assert 0.2 * 686 < n < 0.3 * 686 and all(r["n"] == n for r in rows.values())  # the same patients
    for r in rows.values():
        lo, hi = r["ci95"]["harrell"]
        assert 0 < lo <= r["harrell"] <= hi < 1
    # the covariates carry the recurrence hazard (a clinician's Cox model: 0.65-0.71 on this split)
    assert rows["raw_ehr_cox"]["harrell"] > 0.6
    assert doc["ratio"] == rows["ehr"]["harrell"] / rows["raw_ehr_cox"]["harrell"]
    assert (tmp_path / "encoder.safetensors").exists() and (tmp_path / "eval" / "metrics.json").exists()
    # the cross-validated read-out: every subject (all 686 have follow-up), each row read alike
    cv = doc["results"]["cv"]
    assert (cv["n"], cv["events"], cv["folds"], cv["repeats"]) == (686, 299, 5, 2)
    for name in ROWS:  # two partitions into 5 folds: 10 scores, each partition's mean, their mean
        r = cv[name]
        assert len(r["folds"]) == 10 and r["alpha"] == [100.0] * 10 and 0.5 < r["harrell"] < 0.85
        assert r["repeats"] == pytest.approx([np.mean(r["folds"][:5]), np.mean(r["folds"][5:])], abs=1e-4)
        assert r["harrell"] == pytest.approx(np.mean(r["repeats"]), abs=1e-4)
        assert r["repeats"][0] != r["repeats"][1]  # another partition, other folds
    assert cv["raw_ehr_cox"]["harrell"] > 0.62  # about 0.68 over the whole table
    # a second random start, another draw of the same shape, read on the same folds
    assert cv["random_starts"] == ["random_init:ehr", "random_init_2:ehr"]
    second = cv["random_init_2:ehr"]
    assert len(second["folds"]) == 10 and 0.5 < second["harrell"] < 0.85
    assert second["folds"] != cv["random_init:ehr"]["folds"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["encoders"] == ["pretrained", "random_init", "random_init_2"]
    # data without images: the default (eval.encoder=auto) reads the context encoder
    assert metrics["encoder"]["read"] == "context"
    # evaluate's few-label read-out on an EHR-only table: the EHR input alone, the raw covariates'
    # Cox model beside the encoders, and the two starts compared as one by their mean
    few_eval = metrics["few_labels"]["tasks"]["c-index recurrence"]
    assert set(few_eval) == {"ehr"}
    tenth = few_eval["ehr"]["0.1"]
    assert tenth["of"] == metrics["counts"]["train"]["subjects"] and tenth["labelled"] == round(
        0.1 * tenth["of"]
    )
    versus = tenth["versus"]
    assert set(versus) == {"random_init", "random_init_2", "raw_ehr_cox", "random_starts_mean"}
    both = versus["random_starts_mean"]["test"]
    assert both["of"] == 2 and both["b"] == pytest.approx(
        (versus["random_init"]["test"]["b"] + versus["random_init_2"]["test"]["b"]) / 2
    )
    stamp = tmp_path / "eval" / "embeddings" / "pretrained" / "test.json"
    assert json.loads(stamp.read_text())["read"] == "context"
    # a fifth of each training part labelled (686 x 4/5 x 1/5 = 110 patients), the same for each row
    few = cv["label_fractions"]["0.2"]
    assert "random_init_2:ehr" in few
    for name in ROWS:
        r = few[name]
        assert r["labelled"] == 110 and len(r["folds"]) == 10 and 0.5 < r["harrell"] < 0.85
        assert r["folds"] != cv[name]["folds"]  # fitted on fewer patients
    assert few["raw_ehr_cox"]["harrell"] < cv["raw_ehr_cox"]["harrell"]  # fewer labels, a weaker model
    # the ceilings, supervised on the raw features, read on the same folds and labelled rows
    from bench_real_ehr import CEILINGS

    for name in CEILINGS:
        assert len(cv[name]["folds"]) == 10 and 0.6 < cv[name]["harrell"] < 0.85, name
        assert few[name]["labelled"] == 110 and few[name]["harrell"] < cv[name]["harrell"], name
    assert cv["raw_spline_cox"]["alpha"] == [100.0] * 10 and cv["raw_forest"]["alpha"] == [None] * 10
    assert cv["raw_spline_cox"]["folds"] != cv["raw_ehr_cox"]["folds"]  # another model on the same rows
    h = {name: cv[name]["harrell"] for name in ROWS}
    assert doc["learns_cv"] == (h["ehr"] >= h["random_init:ehr"] and h["ehr"] >= h["raw_ehr_cox"] - 0.02)
    # the folds are drawn over the patients, not over the order the embedding pass wrote them in
    # (which differs between runs): the cached rows shuffled, the read-out is the same, fold by fold
    import pyarrow.parquet as pq
    from bench_real_ehr import cross_validated

    for cached in (tmp_path / "eval" / "embeddings").glob("*/*.parquet"):
        table = pq.read_table(cached)
        pq.write_table(table.take(np.random.default_rng(1).permutation(table.num_rows)), cached)

    # ... and the rows that do not depend on the encoder are read once per table and folds (a
    # multi-seed run's later seeds reuse them): no ceiling is fit again
    def unfit(*_, **__):
        raise AssertionError("a raw-feature row was fit again")

    monkeypatch.setattr(bench_real_ehr, "ForestCox", unfit)
    monkeypatch.setattr(bench_real_ehr, "SplineCox", unfit)
    again = cross_validated(tmp_path / "eval", alphas=(100.0,), repeats=2)
    for row in (*ROWS, "random_init_2:ehr", *CEILINGS):
        assert again[row]["folds"] == cv[row]["folds"], row
    again["raw_forest"]["folds"].clear()  # a caller's copy: the kept read is not changed
    assert cross_validated(tmp_path / "eval", alphas=(100.0,), repeats=2)["raw_forest"] == cv["raw_forest"]
    with pytest.raises(AssertionError, match="fit again"):  # other folds: read anew
        cross_validated(tmp_path / "eval", alphas=(100.0,), repeats=2, seed=1)
    # --no-ceilings (a table of thousands of rows): the same read-out on other folds fits no ceiling
    lean = cross_validated(tmp_path / "eval", alphas=(100.0,), repeats=2, seed=1, ceilings=False)
    assert not set(CEILINGS) & set(lean) and all(len(lean[row]["folds"]) == 10 for row in ROWS)
    assert lean["ehr"]["folds"] != cv["ehr"]["folds"]  # other folds, read anew


def test_the_real_table_benchmark_judges_the_criterion_over_splits():
    """`bench_real_ehr --splits/--seeds`: the paired differences per run, their mean with a t
    interval, and in how many runs the per-run criterion held."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_real_ehr import summarise

    def doc(ehr, rnd, raw, cv=(0.68, 0.67, 0.68), few=None):
        h = {"ehr": ehr, "random_init:ehr": rnd, "raw_ehr_cox": raw}
        c = {k: {"harrell": v} for k, v in zip(h, cv, strict=True)}
        if few is not None:  # {fraction: (pretrained, random init, raw)}
            c["label_fractions"] = {
                f: {k: {"harrell": v} for k, v in zip(h, row, strict=True)} for f, row in few.items()
            }
        return {"results": {"test": {k: {"harrell": v} for k, v in h.items()}, "cv": c}}

    s = summarise([doc(0.70, 0.66, 0.70), doc(0.60, 0.62, 0.66), doc(0.68, 0.64, 0.69)])
    assert s["runs"] == 3 and s["learns_in"] == 2
    d = s["pretrained_minus_raw_cox"]
    assert d["values"] == [0.0, -0.06, -0.01] and d["mean"] == pytest.approx(-0.07 / 3)
    # t(0.975, 2) = 4.303; sd of (0, -0.06, -0.01) = 0.03215
    half = 4.303 * 0.032146 / 3**0.5
    assert d["ci95"] == pytest.approx([d["mean"] - half, d["mean"] + half], abs=1e-4)
    assert s["pretrained_minus_random_init"]["mean"] == pytest.approx(0.02)
    assert s["raw_cox"]["mean"] == pytest.approx(0.6833, abs=1e-4)
    # the cross-validated rows are judged alike: 0.68 >= 0.67 and >= 0.68 - 0.02 holds; 0.64 does not
    assert s["cv"]["learns_in"] == 3 and s["cv"]["pretrained_minus_raw_cox"]["mean"] == pytest.approx(0.0)
    s = summarise([doc(0.70, 0.66, 0.70), doc(0.70, 0.66, 0.70, cv=(0.64, 0.67, 0.68))])
    assert s["cv"]["learns_in"] == 1 and s["cv"]["pretrained_minus_random_init"]["values"] == [0.01, -0.03]
    one = summarise([doc(0.70, 0.66, 0.70)])
    assert one["pretrained"]["ci95"] is None and one["learns_in"] == 1
    assert "label_fractions" not in one["cv"]
    # the few-label read-outs, fraction by fraction: paired differences and a count
    s = summarise(
        [
            doc(0.70, 0.66, 0.70, few={"0.1": (0.62, 0.60, 0.63), "0.5": (0.66, 0.66, 0.67)}),
            doc(0.70, 0.66, 0.70, few={"0.1": (0.61, 0.60, 0.60), "0.5": (0.65, 0.66, 0.66)}),
        ]
    )
    few = s["cv"]["label_fractions"]
    assert list(few) == ["0.1", "0.5"]
    assert few["0.1"]["pretrained_minus_random_init"]["values"] == [0.02, 0.01]
    assert (
        few["0.1"]["pretrained_at_least_random_init_in"] == 2
        and few["0.5"]["pretrained_at_least_random_init_in"] == 1
    )
    assert few["0.5"]["pretrained_minus_raw_cox"]["mean"] == pytest.approx(-0.01)
    assert "random_starts" not in s["cv"]  # one start per run: nothing to average
    # several random starts per run: pretraining against their mean, and where it ranks among them
    with_starts = []
    for ehr, starts in ((0.68, (0.67, 0.69, 0.68)), (0.70, (0.71, 0.72, 0.70))):
        d = doc(0.70, 0.66, 0.70, cv=(ehr, starts[0], 0.68))
        cv = d["results"]["cv"]
        cv["random_starts"] = ["random_init:ehr", "random_init_2:ehr", "random_init_3:ehr"]
        cv["random_init_2:ehr"], cv["random_init_3:ehr"] = ({"harrell": h} for h in starts[1:])
        with_starts.append(d)
    s = summarise(with_starts)["cv"]
    json.dumps(s)  # the benchmark writes it: plain numbers, no numpy scalars
    assert s["random_starts"] == 3 and s["starts_at_most_pretrained"] == [2, 1]
    assert s["pretrained_minus_mean_of_starts"]["values"] == [0.0, -0.01]
    assert s["pretrained_at_least_mean_of_starts_in"] == 1
    assert s["mean_of_starts"]["mean"] == pytest.approx((0.68 + 0.71) / 2)


def test_the_random_init_baseline_is_the_weights_the_run_started_from():
    """An export records the seed its run drew its initial weights from; evaluate's random init is
    then exactly that start (pretrained vs random init: what pretraining did to it), and a
    random init drawn from eval.seed for an export that does not say."""
    from jepa_ray.eval.embed import EncoderSource
    from jepa_ray.eval.evaluate import random_init_source, random_start_names, random_start_sources
    from jepa_ray.train.loop import initial_model

    cfg = load_config(overrides=["pipeline.seed=3", "pipeline.image_size=32", "pipeline.patch_size=8"])
    dims = {"channels": 1, "image_size": 32, "patch_size": 8, "vocab_size": 5, "n_num": 3, "cat_sizes": [4, 5],
            "max_static_codes": 8, "max_events": 16}  # fmt: skip
    start = initial_model(cfg, dims).state_dict()
    info = {"dims": dims, "model": cfg.model.model_dump(mode="json"), "init_seed": 3}
    source = random_init_source(EncoderSource("pretrained", None, info), seed=0)
    assert source.seed == 3 and source.name == "random_init"
    built = source.build().state_dict()
    assert built.keys() == start.keys()
    for name, w in start.items():
        torch.testing.assert_close(built[name], w, rtol=0, atol=0, msg=name)
    other = random_init_source(EncoderSource("pretrained", None, {**info, "init_seed": 4}), seed=0).build()
    assert any(not torch.equal(w, start[name]) for name, w in other.state_dict().items())  # another start
    # eval.random_starts: the own start first, then the seeds after it, each a start of its own
    starts = random_start_sources(EncoderSource("pretrained", None, info), seed=0, starts=3)
    assert [(s.name, s.seed) for s in starts] == [
        ("random_init", 3),
        ("random_init_2", 4),
        ("random_init_3", 5),
    ]
    assert random_start_names(["pretrained", "mae", "random_init", "random_init_2", "random_init_x"]) == [
        "random_init",
        "random_init_2",
    ]
    info.pop("init_seed")
    assert random_init_source(EncoderSource("pretrained", None, info), seed=7).seed == 7


def test_a_few_label_read_out_labels_enough_events_to_fit_on():
    """`labelled_rows` (evaluate's few-label read-out and `bench_real_ehr`'s): the first fraction of
    the drawn rows, at least MIN_LABELLED of them, and more where those hold fewer than MIN_EVENTS
    events (a table with rare events)."""
    from jepa_ray.eval.fewlabel import MIN_EVENTS, MIN_LABELLED, labelled_rows

    drawn = np.random.default_rng(0).permutation(1000)
    common = (np.arange(1000) % 2).astype(float)  # every second row an event
    rows = labelled_rows(drawn, common, 0.1)
    assert rows.tolist() == sorted(drawn[:100])
    assert labelled_rows(drawn, common, 0.01).tolist() == sorted(drawn[:MIN_LABELLED])
    rare = np.zeros(1000)
    rare[drawn[[5, 150, 300, 450, 600, 750, 900]]] = 1  # 7 events, the 6th at draw position 750
    rows = labelled_rows(drawn, rare, 0.1)
    assert len(rows) == 751 and rare[rows].sum() == MIN_EVENTS
    few = np.zeros(1000)
    few[drawn[[3, 400]]] = 1  # fewer than MIN_EVENTS in all: up to the last of them
    assert len(labelled_rows(drawn, few, 0.1)) == 401
    assert len(labelled_rows(drawn, np.zeros(1000), 0.1)) == 100  # none at all: the fraction


def test_the_real_table_ceilings_read_a_hazard_that_is_not_linear_in_a_covariate():
    """`bench_real_ehr`'s ceilings: a U-shaped hazard in one covariate (both extremes at risk), which
    a linear Cox model cannot rank, the hinge-feature Cox model and the forest can; both take
    missing values and score rows they were not fit on."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_real_ehr import ForestCox, SplineCox

    from jepa_ray.eval.survival import RidgeCox, harrell

    rng = np.random.default_rng(0)
    n = 600
    x = np.column_stack([rng.normal(size=n), rng.normal(size=n), rng.integers(0, 2, n).astype(float)])
    truth = 2.0 * np.abs(x[:, 0])
    time = rng.exponential(1.0 / np.exp(truth - 1.0))
    event = (rng.random(n) < 0.8).astype(float)
    x[rng.random(n) < 0.05, 1] = np.nan  # a covariate missing for some patients
    fit, held = np.arange(400), np.arange(400, n)
    scores, fitted = {}, {}
    for name, model in (("linear", RidgeCox), ("spline", SplineCox), ("forest", ForestCox)):
        m = fitted[name] = model(x[fit], time[fit], event[fit], alpha=10.0)
        risk = m.risk(x[held])
        assert risk.shape == (len(held),) and np.isfinite(risk).all(), name
        scores[name] = harrell(time[held], event[held], risk)
    best = harrell(time[held], event[held], truth[held])  # the true hazard's ranking
    assert best > 0.7 and scores["linear"] < 0.6, (best, scores)
    assert scores["spline"] > best - 0.04 and scores["forest"] > best - 0.07, (best, scores)
    spline = fitted["spline"]
    assert [j for j, _ in spline.knots] == [0, 1]  # the binary column gets no hinge
    assert spline.design(x[held]).shape == (len(held), 3 + 2 * 4)
    # with 27 labelled rows (GBSG2's 5% read-out) the forest's leaves shrink so that it still splits
    few = ForestCox(x[:27], time[:27], event[:27])
    assert few.model.min_samples_leaf == 4 and fitted["forest"].model.min_samples_leaf == 15
    assert harrell(time[held], event[held], few.risk(x[held])) > 0.55  # 0.500 with leaves of 15


def test_retrieval_on_a_cohort_without_images_says_so_instead_of_failing():
    """An EHR-only cohort (a registry table: no sample has an image) evaluates: the retrieval rows
    say there is no sample with both modalities."""
    import numpy as np

    from jepa_ray.eval.evaluate import _retrieval
    from jepa_ray.eval.samples import Split

    n, d = 30, 8
    cols = {
        "key": np.array([f"s{i}" for i in range(n)]),
        "has_image": np.zeros(n, bool),
        "has_ehr": np.ones(n, bool),
        "emb_image": np.zeros((n, d), np.float32),
        "img_tokens": np.zeros((n, 16 * d), np.float16),
        **{c: np.zeros((n, d), np.float32) for c in ("q_img2ehr", "g_ehr", "q_ehr2img", "g_img")},
    }
    splits = {k: Split(dict(cols), [{"subject": s} for s in cols["key"]], 0) for k in ("train", "test")}
    raw = {k: np.ones((n, 5)) for k in splits}
    out = _retrieval(splits, ["test"], raw, load_config())
    assert out["test"]["image_to_ehr"] == {"n": 0, "note": "no sample with both modalities"}
    assert (
        out["test"]["image_to_ehr_linear"]["n"] == 0
        and "with both modalities" in out["test"]["image_to_ehr_linear"]["note"]
    )


def test_one_sample_per_subject_comes_out_in_key_order_whatever_order_it_was_written_in():
    """An embedding pass writes rows in whatever order Ray Data finished them; the rows the probes
    fold over must not depend on that, or two runs of `evaluate` on one encoder disagree."""
    from jepa_ray.eval.evaluate import one_per_subject

    rng = np.random.default_rng(0)
    # 30 subjects, 1-3 studies each; the earliest study has the longest follow-up
    keys, meta = [], []
    for s in range(30):
        for visit in range(int(rng.integers(1, 4))):
            keys.append(f"s{s:02d}-v{visit}")
            meta.append(json.dumps({"subject": f"s{s:02d}", "tte": {"death": {"days": 900 - 100 * visit}}}))
    cols = {"key": np.array(keys), "meta": np.array(meta), "emb": rng.normal(size=(len(keys), 4))}
    first = one_per_subject(cols)
    assert list(first.cols["key"]) == [f"s{s:02d}-v0" for s in range(30)]
    for _ in range(3):
        perm = rng.permutation(len(keys))
        shuffled = one_per_subject({k: v[perm] for k, v in cols.items()})
        assert list(shuffled.cols["key"]) == list(first.cols["key"])
        np.testing.assert_array_equal(shuffled.cols["emb"], first.cols["emb"])
        assert shuffled.dropped_later_studies == len(keys) - 30


def test_a_registry_table_is_written_without_covariates_recorded_after_the_outcome(tmp_path):
    """flchain's `chapter` is the cause of death, known only for those who died: left in, it hands
    any read-out the outcome (Harrell 0.93 instead of about 0.80)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_real_ehr import write_registry

    paths = write_registry(tmp_path / "flchain", "flchain")
    static = pd.read_parquet(paths["static"])
    outcomes = pd.read_parquet(paths["outcomes"])
    assert "chapter" not in static.columns
    assert {"age", "kappa", "lambda", "creatinine", "sex"} <= set(static.columns)
    assert len(static) == len(outcomes) == 7874 and outcomes["event_event"].sum() == 2169
    # another registry keeps every covariate
    whas = pd.read_parquet(write_registry(tmp_path / "whas500", "whas500")["static"])
    assert len(whas.columns) == 1 + 14
