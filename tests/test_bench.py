"""`jepa-ray bench train|stream` on the shared local Ray (2 CPUs): 1 and 2 workers, tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from jepa_ray.bench import PHASES, parse_workers
from jepa_ray.cli import app
from jepa_ray.errors import ConfigError

SMALL = [
    "pipeline.image_size=32",
    "pipeline.patch_size=8",
    "pipeline.max_events=12",
    "pipeline.batch_size=4",
    "model.width=64",
    "model.depth=2",
    "model.heads=2",
    "train.cpus_per_worker=0.5",
]


def test_bench_train_on_1_and_2_workers_writes_its_table_json_and_plot(small_shards, tmp_path, ray_session):
    out = tmp_path / "bench"
    args = ["bench", "train", "--workers", "2,1", "--steps", "6", "--out", str(out)]
    r = CliRunner().invoke(
        app, [*args, f"train.shards={small_shards}", f"train.storage_path={tmp_path / 'runs'}", *SMALL]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "bench-train.json").read_text())
    rows = doc["rows"]
    assert [row["workers"] for row in rows] == [1, 2]  # sorted, the smallest is the baseline
    assert rows[0]["scaling_efficiency"] == 1.0 and rows[0]["ceiling_scaling"] == 1.0
    for row in rows:
        assert row["samples_per_s"] > 0
        assert row["samples_per_s_per_worker"] == pytest.approx(row["samples_per_s"] / row["workers"])
        assert row["scaling_efficiency"] == pytest.approx(
            row["samples_per_s_per_worker"] / rows[0]["samples_per_s_per_worker"]
        )
        assert 0 <= row["data_wait"] < 1
        assert all(row[k] is not None and row[k] >= 0 for k in PHASES) and row["ms_forward"] > 0
        assert row["peak_mem_mb_per_rank"] > 100  # a worker process with torch and DeepSpeed loaded
        assert row["mfu"] is None  # no GPU
        # the compute ceiling: as many bare training processes at once, no data, no communication
        assert row["ceiling_samples_per_s"] > 0
        assert row["ceiling_scaling"] == pytest.approx(
            row["ceiling_samples_per_s"] / row["workers"] / rows[0]["ceiling_samples_per_s"]
        )
        assert row["ceiling_scaling"] > 0  # its size is a measurement of this machine, not a property to test
        assert row["of_ceiling"] == pytest.approx(row["scaling_efficiency"] / row["ceiling_scaling"])
    assert doc["flops_per_sample"] > 0
    table = (out / "bench-train.txt").read_text()
    assert table.splitlines()[0].split()[:3] == ["workers", "samples/s", "/worker"]
    assert len(table.splitlines()) == 3
    assert (out / "bench-train.png").stat().st_size > 5000
    assert (out / "jepa-ray.log").exists()


def test_bench_stream_reports_the_pipeline_against_the_decode_limit(small_shards, tmp_path, ray_session):
    out = tmp_path / "bench"
    r = CliRunner().invoke(
        app, ["bench", "stream", "--samples", "64", "--out", str(out), f"train.shards={small_shards}", *SMALL]
    )
    assert r.exit_code == 0, r.output
    row = json.loads((out / "bench-stream.json").read_text())["rows"][0]
    assert row["samples"] >= 64 and row["samples_per_s"] > 0 and row["cpus"] == 2
    assert row["samples_per_s_per_cpu"] == pytest.approx(row["samples_per_s"] / 2)
    assert row["decode_limit_per_cpu"] > 0
    assert row["of_decode_limit"] == pytest.approx(row["samples_per_s_per_cpu"] / row["decode_limit_per_cpu"])
    assert (out / "bench-stream.png").stat().st_size > 5000


def test_bench_refuses_what_cannot_run_before_any_run(small_shards, tmp_path, ray_session):
    assert parse_workers("4, 1,2,2") == [1, 2, 4]
    for bad in ("", "a,b", "0,1"):
        with pytest.raises(ConfigError, match="--workers"):
            parse_workers(bad)
    r = CliRunner().invoke(
        app,
        ["bench", "train", "--workers", "1,8", "--out", str(tmp_path / "b"), f"train.shards={small_shards}",
         f"train.storage_path={tmp_path / 'runs'}", *SMALL],
    )  # fmt: skip
    assert r.exit_code != 0 and "needs 4 CPUs; the Ray cluster has 2" in r.output
    assert not (tmp_path / "runs").exists()  # not even the 1-worker run started


def test_the_gpu_rows_script_runs_its_benchmarks_and_writes_json(tmp_path):
    """benchmarks/gpu-rows.sh, the one run a lent GPU machine gets, checked here with QUICK=1 (the tiny
    model on the CPU): both benchmarks run, the DeepSpeed ZeRO-2 engine included, and leave JSON."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "MASTER_PORT": "29547"}
    r = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu-rows.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    forms = gpu["results"]
    assert set(forms) == {"fp32", "bf16", "zero2_bf16"}
    for f in forms.values():
        assert f["samples_per_s"] == pytest.approx(gpu["config"]["batch"] / f["s_per_step"])
        assert f["mfu"] is None  # no GPU, no peak to divide by
    assert gpu["ratios"]["bf16_over_fp32"] == pytest.approx(
        forms["bf16"]["samples_per_s"] / forms["fp32"]["samples_per_s"]
    )
    assert gpu["config"]["flops_per_sample"] > 0 and gpu["hardware"]["gpu"] is None
    model = json.loads((tmp_path / "model-gpu.json").read_text())
    assert model["ratio"] > 1.0  # the context encoder pays less with fewer patches visible
    assert "ZeRO-2 engine / bare bf16" in (tmp_path / "gpu.log").read_text()


def test_the_learning_benchmark_refuses_a_one_member_committee_before_any_work(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning.py"
    r = subprocess.run(
        [sys.executable, str(script), "--survival-stopping", "committee", "--head-seeds", "1",
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "committee needs --head-seeds of at least 2, got 1" in r.stderr
    assert not (tmp_path / "work").exists()  # no cohort written


def _bench_script(monkeypatch, script: str = "bench_learning"):
    """benchmarks/<script>.py as a module; it sets a salt and a path on import, both undone after
    the test."""
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setenv("JEPA_RAY_SALT", "test-salt-not-secret-0123456789abcdef0123")
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(script, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_ehr_reads_take_the_raw_features_by_part_and_score_out_of_fold(monkeypatch):
    """bench_ehr_reads: the raw features' parts are their columns (statics, counts, means), the
    one mean is over the valued codes with 0 for none; a hazard planted in a mean value is read
    out of fold from the means and not from the statics."""
    import numpy as np

    bench = _bench_script(monkeypatch, "bench_ehr_reads")
    rng = np.random.default_rng(0)
    n = 400
    statics, counts, means = (
        rng.normal(size=(n, 3)),
        rng.poisson(2, size=(n, 4)).astype(float),
        rng.normal(size=(n, 2)),
    )
    means[:5, 1] = np.nan  # no value of that code
    parts = bench.raw_parts(np.concatenate([statics, counts, means], 1), n_static=3, n_valued=2)
    np.testing.assert_array_equal(parts["statics"], statics)
    np.testing.assert_array_equal(parts["counts"], counts)
    np.testing.assert_array_equal(parts["means"], means)
    np.testing.assert_allclose(parts["one_mean"][:, 0], np.nan_to_num(means).mean(1))
    time_ = rng.exponential(size=n) / np.exp(1.5 * np.nan_to_num(means[:, 0]))
    event = rng.random(n) < 0.8
    fold = np.arange(n) % 5
    scored = np.ones(n, bool)
    read = bench.cross_fit_cindex(parts["means"], time_, event, scored, fold)
    blind = bench.cross_fit_cindex(parts["statics"], time_, event, scored, fold, (1.0, 100.0))
    assert read > 0.75 and 0.4 < blind < 0.6, (read, blind)
    assert bench.cross_fit_cindex(parts["means"], time_, event, scored & (fold > 0), fold) != read


def test_the_fusion_bounds_read_out_has_the_r2_it_is_asked_for(monkeypatch):
    """bench_learning's fusion bound blurs each true latent to a given R² (`read_at`); the bound is
    only what it says if the read-out's R² against the latent is that value, 0 and 1 included."""
    import numpy as np

    bench = _bench_script(monkeypatch)
    z = np.random.default_rng(0).standard_normal(200_000)
    for r2 in (0.0, 0.12, 0.34, 0.9, 1.0):
        x = bench.read_at(z, r2, np.random.default_rng(1))
        assert np.corrcoef(x, z)[0, 1] ** 2 == pytest.approx(r2, abs=0.005)
        assert x.std() == pytest.approx(1.0, abs=0.01)  # a standardised read-out, as the latents
    assert np.array_equal(bench.read_at(z, 1.7, np.random.default_rng(1)), z)  # clipped to exact


def test_the_learning_benchmarks_intervals_resample_subjects_and_pair_the_encoders(monkeypatch):
    """bench_learning's per-seed read-outs come with 95% intervals over subject resamples, and
    the JEPA is compared with each baseline on the same resamples: a planted better encoder is
    beyond noise, a twin of the same quality is not, on every factor."""
    import numpy as np
    from sklearn.metrics import r2_score

    bench = _bench_script(monkeypatch)
    rng = np.random.default_rng(0)
    subjects, studies = 200, 2
    groups = np.repeat([f"s{i}" for i in range(subjects)], studies).tolist()
    z = np.repeat(rng.standard_normal((subjects, 4)), studies, axis=0)

    def encoder(noise: float, fits: int = 1) -> dict:  # out-of-fold predictions (N, F, fits)
        err = lambda: np.repeat(rng.standard_normal((subjects, 4)), studies, axis=0)[..., None]  # noqa: E731
        return {
            r: z[..., None] + noise * np.concatenate([err() for _ in range(k)], -1)
            for r, k in (("linear", 1), ("attentive", fits), ("knn", 1))
        }

    good, bad, twin = encoder(0.5, fits=3), encoder(1.0, fits=3), encoder(0.5, fits=3)
    resamples = bench.subject_resamples(groups, n=400)
    assert resamples.shape == (400, len(groups)) and np.all(resamples.sum(1) == len(groups))
    got = bench.scores(good, z, resamples)
    for j, f in enumerate(bench.FACTORS):  # the attentive R²: the mean over the probe's fits
        fits = [r2_score(z[:, j], good["attentive"][:, j, k]) for k in range(3)]
        assert got["attentive"][f] == pytest.approx(np.mean(fits))
        assert got["attentive_per_probe_seed"][1][f] == pytest.approx(fits[1])
        lo, hi = got["ci95"]["attentive"][f]
        assert lo < got["attentive"][f] < hi and hi - lo < 0.15
    better = bench.paired([(good, bad)], z, resamples)
    same = bench.paired([(good, twin)], z, resamples)
    for f in bench.FACTORS:
        d = better["attentive"][f]
        assert d["beyond_noise"] and d["ci95"][0] > 0
        assert d["difference"] == pytest.approx(got["attentive"][f] - bench.scores(bad, z)["attentive"][f])
        assert not same["attentive"][f]["beyond_noise"]
    # over seeds: the mean of the seeds' differences, on the same subject resamples
    pooled = bench.paired([(good, bad), (good, twin)], z, resamples)["attentive"]
    for f in bench.FACTORS:
        mean = (better["attentive"][f]["difference"] + same["attentive"][f]["difference"]) / 2
        assert pooled[f]["difference"] == pytest.approx(mean)
        assert pooled[f]["ci95"][0] < mean < pooled[f]["ci95"][1]


def test_the_learning_benchmarks_grid_readout_reads_a_factor_spread_over_positions(monkeypatch):
    """A factor written into every patch token along a direction of each position's own (as bone
    density is spread over ribs and spine) averages away in the mean-pooled tokens; the grid
    read-out, a ridge on the tokens concatenated in grid order, reads it, and `cells_won` counts
    the cells of one read-out."""
    import numpy as np
    from sklearn.metrics import r2_score

    bench = _bench_script(monkeypatch)
    rng = np.random.default_rng(0)
    n, positions, dim = 400, 4, 8
    z = rng.standard_normal((n, 4))
    directions = rng.standard_normal((positions, dim))
    directions -= directions.mean(0)  # they cancel in the mean over positions
    tokens = 0.5 * rng.standard_normal((n, positions, dim)) + z[:, 2, None, None] * directions
    groups = [f"s{i}" for i in range(n)]
    preds = bench.oof_readouts(tokens.mean(1), tokens, z, groups, seed=0)
    assert set(preds) == set(bench.READOUTS) and preds["grid"].shape == (n, 4, 1)
    assert r2_score(z[:, 2], preds["grid"][:, 2, 0]) > 0.9
    assert r2_score(z[:, 2], preds["linear"][:, 2, 0]) < 0.1
    runs = [
        {arm: {"grid": dict(zip(bench.FACTORS, v, strict=True))} for arm, v in cells.items()}
        for cells in (
            {"jepa": [0.6, 0.7, 0.5, 0.3], "random": [0.5, 0.7, 0.6, 0.2], "mae": [0.4, 0.6, 0.4, 0.1]},
        )
    ]
    assert bench.cells_won(runs, "grid") == [True, False, False, True]


def test_the_learning_benchmarks_attentive_probe_per_factor_reads_each_factor_by_its_own_probe(monkeypatch):
    """With per_factor, the attentive read-out of factor j is the probe fit on factor j alone (its
    own query, values and epochs), in the factors' order, one column per fit."""
    import numpy as np
    from sklearn.metrics import r2_score

    from jepa_ray.eval.attentive import oof_attentive

    bench = _bench_script(monkeypatch)
    rng = np.random.default_rng(1)
    n, positions, dim, factors = 120, 4, 8, 2  # two factors: the order is seen, at half the fits
    z = rng.standard_normal((n, factors))
    tokens = 0.3 * rng.standard_normal((n, positions, dim))
    tokens[:, :, :factors] += z[:, None, :]  # every factor in every position, one channel each
    groups = [f"s{i // 2}" for i in range(n)]
    preds = bench.oof_readouts(tokens.mean(1), tokens, z, groups, seed=1, probe_seeds=2, per_factor=True)
    assert preds["attentive"].shape == (n, factors, 2)
    alone = oof_attentive(tokens, z[:, 1:2], groups, seed=2 * 1 + 1)[:, 0]  # the second factor, second seed
    np.testing.assert_allclose(preds["attentive"][:, 1, 1], alone, rtol=1e-6)
    assert min(r2_score(z[:, j], preds["attentive"][:, j, 0]) for j in range(factors)) > 0.5


def test_the_learning_benchmark_reads_the_encoder_it_is_asked_for(monkeypatch):
    """`image_views` reads the target encoder unless asked for the context one (--read-context),
    the image alone, in eval mode, and leaves the model training again."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    bench = _bench_script(monkeypatch)

    class Model(torch.nn.Module):
        dims = SimpleNamespace(patches=2)

        def __init__(self):
            super().__init__()
            self.calls = []

        def encode(self, b, modality, encoder="target"):
            self.calls.append((modality, encoder, self.training))
            tokens = torch.full((len(b["x"]), 4, 3), 1.0 if encoder == "target" else 2.0)
            tokens[:, 0] = -1.0  # the global token, left out of the patch tokens
            return {"tokens": tokens, "pooled": tokens[:, 1:].mean(1)}

    model = Model()
    batches = [{"x": [0, 1]}, {"x": [2]}]
    pooled, tokens = bench.image_views(model, batches)
    assert model.calls == [("image", "target", False)] * 2 and model.training
    assert pooled.shape == (3, 3) and tokens.shape == (3, 2, 3) and np.all(tokens == 1.0)
    _, tokens = bench.image_views(model, batches, "context")
    assert model.calls[2:] == [("image", "context", False)] * 2 and np.all(tokens == 2.0)


def test_the_learning_benchmark_pairs_the_c_index_over_seeds_on_the_same_subjects(monkeypatch):
    """`cindex_over_seeds`: the JEPA's c-index minus another arm's averaged over seeds, its interval
    that of subject resamples each scoring every seed's both arms; a strategy whose rows differ
    between seeds or arms is left out rather than paired across different subjects."""
    import numpy as np

    from jepa_ray.eval.survival import harrell

    bench = _bench_script(monkeypatch)
    rng = np.random.default_rng(2)
    n = 150
    time = rng.integers(1, 60, n).astype(float)
    event = rng.random(n) < 0.6
    rows = np.arange(n) * 2  # rows of the split each head scored

    def arm(signal: float) -> dict:
        risk = signal * -time / 20 + rng.standard_normal(n)
        return {
            "image": {"test": (rows, time, event, risk)},
            "ehr": {"test": (rows if signal else rows + 1, time, event, risk)},  # other rows in random init
        }

    seed_risks = [{"jepa": arm(1.0), "random": arm(0.0)} for _ in range(3)]
    out = bench.cindex_over_seeds(seed_risks, ["random"])["jepa-random"]
    d = out["image"]["test"]
    per_seed = [
        harrell(time, event, r["jepa"]["image"]["test"][3])
        - harrell(time, event, r["random"]["image"]["test"][3])
        for r in seed_risks
    ]
    assert d["difference"] == pytest.approx(np.mean(per_seed)) and d["n"] == n
    assert d["beyond_noise"] and 0 < d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    assert "ehr" not in out


def test_the_embedding_cox_read_is_out_of_fold_and_skips_subjects_without_ehr(monkeypatch):
    """`embedding_cox`: a ridge Cox model on the pooled EHR embedding, fit on the other folds'
    subjects with EHR: it reads a hazard the embedding carries, a fold's own outcomes never reach
    its risks, and a subject without EHR gets none."""
    from types import SimpleNamespace

    import numpy as np

    bench = _bench_script(monkeypatch)
    rng = np.random.default_rng(2)
    n = 300
    emb = rng.standard_normal((n, 8))
    time = np.exp(1.0 - emb[:, 0] + 0.5 * rng.standard_normal(n))
    event = rng.random(n) < 0.7
    has = rng.random(n) < 0.9
    kept = rng.integers(1, 9, n)  # EHR tokens kept per subject
    keep = np.arange(8)[None, :] < kept[:, None]
    tokens = rng.standard_normal((n, 8, 3))

    def split(i: int) -> SimpleNamespace:
        return SimpleNamespace(
            ehr_pooled=emb[i::2], has_ehr=has[i::2], ehr_keep=keep[i::2], ehr_tokens=tokens[i::2]
        )

    inputs = {"a": split(0), "b": split(1)}
    origin = np.array(["a", "b"] * (n // 2), dtype=object)
    row = np.arange(n) // 2  # subject i is row i // 2 of split a (even) or b (odd)
    cf = {"origin": origin, "row": row, "fold": rng.permutation(n) % 4, "time": time, "event": event}
    has_ehr = {k: v.has_ehr for k, v in inputs.items()}

    def read(cf: dict, name: str = "ehr_embedding_cox") -> np.ndarray:
        features = {k: bench.embedding_features(v, name, 2, v.ehr_tokens[:, :2].reshape(len(v.ehr_tokens), -1) * 2)
                    for k, v in inputs.items()}  # fmt: skip
        return bench.embedding_cox(cf, features, has_ehr)

    risk = read(cf)
    assert np.isnan(risk[~has]).all() and np.isfinite(risk[has]).all()
    from jepa_ray.eval.survival import harrell

    assert harrell(time[has], event[has], risk[has], cf["fold"][has]) > 0.7
    own = cf["fold"] == 0
    shuffled = dict(cf, time=np.where(own, rng.permutation(time), time))
    assert read(shuffled)[own & has] == pytest.approx(risk[own & has])
    # the reads beside the pooled embedding: a hazard in how many tokens were kept is read only by
    # those that take the count, and the maximum of the kept tokens is taken over kept ones only
    cf = dict(cf, time=np.exp(1.0 - kept + 0.5 * rng.standard_normal(n)))
    reads = {r: read(cf, r) for r in bench.EMBEDDING_READS}
    c = {r: harrell(cf["time"][has], event[has], v[has], cf["fold"][has]) for r, v in reads.items()}
    assert c["ehr_embedding_cox"] < 0.6 < 0.75 < min(c["ehr_embedding_count_cox"], c["ehr_meanmax_count_cox"])
    x = bench.embedding_features(inputs["a"], "ehr_meanmax_count_cox")
    first = inputs["a"].ehr_keep.sum(1) == 1  # one token kept: its maximum is that token
    assert x.shape == (n // 2, 8 + 3 + 1) and np.allclose(x[first, 8:11], inputs["a"].ehr_tokens[first, 0])
    # the static slots lead the layout: the encoder's read takes them side by side
    static = bench.embedding_features(inputs["a"], "ehr_static_slots_cox", 2)
    assert static.shape == (n // 2, 2 * 3) and np.array_equal(static[:, 3:], inputs["a"].ehr_tokens[:, 1])


def test_the_learning_benchmark_pairs_cross_fitted_risks_within_folds_over_seeds(monkeypatch):
    """`cross_fit_over_seeds`: late fusion minus each unimodal head per arm and the JEPA minus each
    other arm per strategy, averaged over seeds on the cross-fitted subjects with both modalities,
    pairs counted within a fold (a fold's shifted risks change nothing); different folds refused."""
    import numpy as np

    from jepa_ray.eval.survival import paired_cindex

    bench = _bench_script(monkeypatch)
    rng = np.random.default_rng(4)
    n = 160
    time = rng.integers(1, 60, n).astype(float)
    event = rng.random(n) < 0.6
    fold = np.arange(n) % 4
    paired = rng.random(n) < 0.8

    def arm(signal: float) -> dict:
        image = signal * -time / 20 + rng.standard_normal(n) + 3.0 * fold  # each fold on its own scale
        ehr = -time / 40 + rng.standard_normal(n)
        fused = image + ehr - 3.0 * fold
        risks = {
            "image": image,
            "ehr": ehr,
            "late_fusion": fused,
            "raw_ehr_cox": ehr,
            "image_with_raw_ehr": fused,
            "ehr_embedding_cox": ehr + 1.5 * rng.standard_normal(n),
        }
        return {"fold": fold, "time": time, "event": event, "paired": paired, "risks": risks}

    seed_cf = [{"jepa": arm(1.0), "random": arm(0.0)} for _ in range(3)]
    out = bench.cross_fit_over_seeds(seed_cf)
    assert set(out) == {
        "late_fusion-unimodal", "image_with_raw_ehr-raw_ehr_cox", "ehr-ehr_embedding_cox",
        "ehr_embedding_cox-raw_ehr_cox", "jepa-random",
    }  # fmt: skip
    noisier = out["ehr_embedding_cox-raw_ehr_cox"]["jepa"]  # the raw model's risk plus noise
    assert noisier["difference"] < 0 and out["ehr-ehr_embedding_cox"]["jepa"]["difference"] > 0
    assert (
        set(out["late_fusion-unimodal"]) == set(out["image_with_raw_ehr-raw_ehr_cox"]) == {"jepa", "random"}
    )
    clinical = out["image_with_raw_ehr-raw_ehr_cox"]["jepa"]  # the JEPA's image head reads the hazard
    assert clinical["beyond_noise"] and clinical["difference"] > 0.03
    p = paired
    d = out["jepa-random"]["image"]
    per_seed = [
        paired_cindex(time[p], event[p], r["jepa"]["risks"]["image"][p], r["random"]["risks"]["image"][p], 0, 0,
                      strata=fold[p])["difference"]
        for r in seed_cf
    ]  # fmt: skip
    assert d["difference"] == pytest.approx(np.mean(per_seed)) and d["n"] == p.sum()
    assert d["beyond_noise"] and d["difference"] > 0.1  # unstratified, the folds' offsets would swamp it
    fused = out["late_fusion-unimodal"]["random"]["image"]  # random init's image head reads noise
    assert fused["beyond_noise"] and fused["difference"] > 0.03 and out["jepa-random"]["ehr"]["ci95"]
    # what the benchmark prints: every difference, named by its path
    named = dict(bench.differences(out))
    assert len(named) == 2 * 2 + 2 + 2 + 2 + 6 and named["late_fusion-unimodal random image"] is fused
    assert named["image_with_raw_ehr-raw_ehr_cox jepa"] is clinical and named["jepa-random image"] is d
    seed_cf[1]["random"]["fold"] = (fold + 1) % 4
    with pytest.raises(ValueError, match="share their subjects and folds"):
        bench.cross_fit_over_seeds(seed_cf)
