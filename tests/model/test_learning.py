"""Does pretraining learn what the images carry? 400 CPU steps of the tiny JEPA per seed (the
default config: SIGReg on, the EMA schedule of a 400-step run; each seed in a process of its own)
on a synthetic cohort of 1,000 subjects, against the same seeds' random initialisations, read out
three ways: the attentive probe on the patch tokens (held-out quarter of the subjects), a ridge
probe on the pooled embedding (out of fold), and the evaluation's own probes (one sample per
subject).

The cohort is benchmarks/bench_learning.py's generator and seed at 1,000 subjects, its radiographs
drawn at 96-128 px instead of the benchmark's 128-256 (both are read at 32 px; the smaller files
write in three quarters of the time). Below ~600 images the probe and the pretraining both starve:
at 400 subjects (582 images) the cardiac gain was noise (+0.01 over three seeds, two negative).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from jepa_ray.config import ModelConfig, SynthConfig, load_config
from jepa_ray.eval import probes
from jepa_ray.eval.attentive import AttentiveSettings, attentive_r2
from jepa_ray.eval.evaluate import first_studies
from jepa_ray.eval.probes import cv_latent_r2
from jepa_ray.ingest.deid import Pseudonymizer
from jepa_ray.ingest.prepare import prepare
from jepa_ray.model.jepa import JEPA, embedding_stats
from jepa_ray.stream.local import raw_batch, read_samples
from jepa_ray.stream.pipeline import collate, open_split
from jepa_ray.stream.transform import transform_batch
from jepa_ray.synth.cohort import cohort_inputs, write_cohort
from jepa_ray.train.local import train_on_samples

FACTORS = ("cardiac", "lung", "frailty")
LABELS = ("cardiomegaly", "abnormal_lung")
SEEDS = (0, 1)
STEPS = 400
SUBJECTS = 1000


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, ray_session):
    """1,000 subjects (about 1,400 radiographs) in 64 px training shards, with their true latents."""
    root = tmp_path_factory.mktemp("learning")
    write_cohort(root / "cohort", SynthConfig(subjects=SUBJECTS, seed=3, min_size=96, max_size=128))
    overrides = ["prepare.image.size=64", "prepare.shards.max_samples=64", "prepare.split.val=0"]
    cfg = load_config(overrides=[*overrides, "prepare.split.test=0"]).prepare
    assert prepare(str(root / "shards"), cfg, **cohort_inputs(root / "cohort")).ok
    split = open_split(str(root / "shards"), "train")
    samples: dict = {}
    for path in split.paths:
        samples.update(read_samples(path))
    pz = Pseudonymizer(os.environ["JEPA_RAY_SALT"].encode())
    latents = pd.read_parquet(root / "cohort" / "latents.parquet")
    truth = {pz.subject(r.subject_id): [getattr(r, f) for f in FACTORS] for r in latents.itertuples()}
    keys = [k for k, f in samples.items() if "image" in f]
    metas = [json.loads(samples[k]["meta"]) for k in keys]
    subjects = [m["subject"] for m in metas]
    labels = {name: np.array([bool(m["labels"][name]) for m in metas]) for name in LABELS}
    held_out = np.array([pz.unit(s) < 0.25 for s in subjects])  # a quarter of the subjects
    first = first_studies(metas, keys)  # the evaluation's one sample per subject
    z = np.array([truth[s] for s in subjects], float)
    return split, samples, keys, subjects, z, (first, labels, held_out)


def _attentive_r2(tokens: np.ndarray, z: np.ndarray, split: tuple, seed: int) -> list[float]:
    """Held-out R² per factor of the attentive probe on patch tokens (N, P, D), fit on every image
    of three quarters of the subjects."""
    _, _, held_out = split
    fit = ~held_out
    r2 = attentive_r2(
        tokens[fit], z[fit], {"test": (tokens[held_out], z[held_out])}, AttentiveSettings(seed=seed)
    )
    return [float(v) for v in r2["test"]["r2"]]


def _evaluation_probes(x: np.ndarray, z: np.ndarray, split: tuple) -> tuple:
    """The evaluation's own probes (`jepa-ray evaluate`) on one sample per subject: latent R² and
    logistic-probe AUROC, fit on three quarters of the subjects, scored on the held-out quarter."""
    first, labels, held_out = split
    x, z, held_out = x[first], z[first], held_out[first]
    labels = {name: y[first] for name, y in labels.items()}
    fit = ~held_out
    r2 = probes.latent_r2(x[fit], z[fit], {"test": (x[held_out], z[held_out])})["test"]["r2"]
    auc = [
        probes.auroc(y[held_out], probes.logistic_probe(x[fit], y[fit])(x[held_out]), 0, 0)["auroc"]
        for y in labels.values()
    ]
    return np.mean(r2), np.mean(auc)


def _embed(model, batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (N, D) and patch tokens (N, P, D) of the target encoder seeing the image only."""
    model.eval()
    n = model.dims.patches
    with torch.no_grad():
        out = [model.encode(b, "image") for b in batches]
    model.train()
    return (
        np.concatenate([o["pooled"].numpy() for o in out]),
        np.concatenate([o["tokens"][:, 1 : 1 + n].numpy() for o in out]),
    )


def _one_seed(seed: int, data: tuple) -> dict:
    """One seed's random init and pretrained model, every read-out of both. Runs in a process of
    its own with one thread (the two seeds side by side: 1.75x the throughput of one process with
    two threads on the tiny model), so the seed fixes everything it computes."""
    samples, spec, cfg, batches, z, subjects, evaluation_split = data
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = JEPA(spec.model_dims(cfg), ModelConfig(preset="tiny"))  # the defaults (SIGReg on)
    x_random, tokens_random = _embed(model, batches)
    losses = train_on_samples(model, samples, spec, cfg, STEPS, lr=1e-3, batch=32, seed=seed)
    x, tokens = _embed(model, batches)
    return {
        "losses": losses,
        "stats": embedding_stats(torch.from_numpy(x)),
        "random_r2": cv_latent_r2(x_random, z, subjects),
        "trained_r2": cv_latent_r2(x, z, subjects),
        "evaluation": [_evaluation_probes(e, z, evaluation_split) for e in (x_random, x)],
        "attentive": [_attentive_r2(t, z, evaluation_split, seed) for t in (tokens_random, tokens)],
    }


def test_pretraining_beats_random_init_on_a_latent_factor_probe(cohort):
    split, samples, keys, subjects, z, evaluation_split = cohort
    cfg = load_config(
        overrides=["pipeline.image_size=32", "pipeline.patch_size=8", "pipeline.max_events=32"]
    ).pipeline
    batches = [
        collate(
            transform_batch(
                raw_batch({k: samples[k] for k in keys[i : i + 128]}), split.spec, cfg, train=False, epoch=0
            )
        )
        for i in range(0, len(keys), 128)
    ]
    data = (samples, split.spec, cfg, batches, z, subjects, evaluation_split)
    with ProcessPoolExecutor(len(SEEDS), mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(_one_seed, SEEDS, [data] * len(SEEDS)))
    for run in runs:
        # measured: 0.95 -> 0.43-0.44 at the default SIGReg weight (at LeJEPA's, SIGReg's fast early fall took it below 0.3x)
        assert np.mean(run["losses"][-10:]) < 0.6 * np.mean(run["losses"][:10])
        stats = run["stats"]
        assert stats["std"] > 0.05 and stats["rankme"] > 5  # no collapse of the pooled embedding
    random_r2, trained_r2 = [r["random_r2"] for r in runs], [r["trained_r2"] for r in runs]
    evaluation, attentive = [r["evaluation"] for r in runs], [r["attentive"] for r in runs]

    # Every read-out's numbers first, then the assertions
    # The attentive probe (a cross-attention pooling head on the frozen patch tokens, the V-JEPA
    # read-out), R² per factor on the held-out quarter of the subjects: (seed, random|trained, factor)
    att = np.array(attentive)
    att_report = "  ".join(f"{f} {a:+.3f} -> {b:+.3f}" for f, a, b in zip(FACTORS, *att.mean(0), strict=True))
    print(f"attentive probe R², random init -> pretrained (mean of {len(SEEDS)} seeds): {att_report}")
    print(f"  per seed: {att.round(3).tolist()}")
    # The linear probe on the mean-pooled tokens, out of fold over every image (folds by subject)
    gains = np.array(trained_r2) - np.array(random_r2)  # (seeds, factors)
    lin_report = "  ".join(
        f"{f} {a:+.3f} -> {b:+.3f}"
        for f, a, b in zip(FACTORS, np.mean(random_r2, 0), np.mean(trained_r2, 0), strict=True)
    )
    print(f"linear probe R², random init -> pretrained: {lin_report}; gain per seed {gains.mean(1).round(3)}")
    # The evaluation's protocol: one sample per subject, held-out subjects, latent R² averaged over
    # the factors and logistic-probe AUROC over the two labels; (seed, random|trained, metric)
    ev = np.array(evaluation)
    print(f"evaluation probes, random init -> pretrained (R², AUROC) per seed: {ev.round(3).tolist()}")

    # measured here, mean of the two seeds, on two held-out quarters (the subject split follows the
    # salt): cardiac 0.521 -> 0.573, lung 0.548 -> 0.589, frailty -0.018 -> 0.159 (mean gain +0.104);
    # and cardiac 0.547 -> 0.599, lung 0.593 -> 0.623, frailty 0.120 -> 0.105 (+0.022); radiographs
    # drawn at 96-128 px: cardiac 0.579 -> 0.659, lung 0.516 -> 0.593, frailty 0.075 -> 0.074
    # (+0.052); and at 400 steps instead of 600 (now): 0.579 -> 0.637, 0.516 -> 0.562, 0.075 ->
    # 0.152 (+0.060); with crops over 0.3-1.0 of the image (now): 0.579 -> 0.629, 0.516 -> 0.582,
    # 0.075 -> 0.083 (+0.041). The mean gain holds on all five; per factor it does not (frailty), so only the mean
    # is asserted. Without SIGReg (model.sigreg=0) pretraining lowered this read-out (0.447 -> 0.311,
    # 0.385 -> 0.357)
    gain = att[:, 1] - att[:, 0]  # (seed, factor)
    assert gain.mean() > 0.01, att_report  # averaged over the seeds and factors
    # measured here: cardiac 0.138 -> 0.301, lung 0.327 -> 0.379, frailty 0.047 -> 0.084; per seed
    # +0.039 and +0.129 (two threads per seed); one thread per seed, the suite's salt: cardiac
    # 0.148 -> 0.337, lung 0.322 -> 0.386, frailty 0.041 -> 0.080; per seed +0.065 and +0.130;
    # drawn at 96-128 px: 0.114 -> 0.266, 0.285 -> 0.386, 0.039 -> 0.068; per seed +0.054 and +0.134;
    # at 400 steps: 0.114 -> 0.236, 0.285 -> 0.348, 0.039 -> 0.060; per seed +0.024 and +0.113;
    # crops over 0.3-1.0: 0.114 -> 0.267, 0.285 -> 0.377, 0.039 -> 0.075; per seed +0.055 and +0.132
    assert (gains.mean(0) > 0.01).all(), lin_report  # every factor
    assert (gains.mean(1) > 0.01).all(), lin_report  # every seed
    # measured here (seed 0, seed 1): R² 0.169 -> 0.157 and 0.103 -> 0.211, AUROC 0.676 -> 0.716 and
    # 0.667 -> 0.710; one thread per seed, the suite's salt: R² 0.228 -> 0.238 and 0.125 -> 0.261,
    # AUROC 0.710 -> 0.754 and 0.682 -> 0.760; drawn at 96-128 px: R² 0.161 -> 0.232 and 0.089 ->
    # 0.253, AUROC 0.677 -> 0.748 and 0.582 -> 0.754; at 400 steps: R² 0.161 -> 0.187 and 0.089 ->
    # 0.230, AUROC 0.677 -> 0.728 and 0.582 -> 0.745; crops over 0.3-1.0: R² 0.161 -> 0.222 and
    # 0.089 -> 0.254, AUROC 0.677 -> 0.754 and 0.582 -> 0.751
    r2_gain, auc_gain = (ev[:, 1] - ev[:, 0]).mean(0)
    assert r2_gain > 0.02 and auc_gain > 0.005, ev.round(3).tolist()
