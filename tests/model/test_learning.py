"""Does pretraining learn what the images carry? A few hundred single-process CPU steps of the tiny
JEPA on a synthetic cohort, then a ridge probe from pooled image embeddings to the ground-truth
latent factors, against the same probe on the same seeds' random initialisations.

What this asserts is what the tiny model learns robustly at this budget (measured with
benchmarks/bench_learning.py, README "Benchmarks"): lung opacity. Heart width (the cardiac factor)
is not learned at 32 px by this model; the probe's numbers for it are reported, not asserted.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from jepa_ray.config import ModelConfig, SynthConfig, load_config
from jepa_ray.data.deid import Pseudonymizer
from jepa_ray.data.local import raw_batch, read_samples, train_on_samples
from jepa_ray.data.pipeline import collate, open_split
from jepa_ray.data.prepare import prepare
from jepa_ray.data.synth import cohort_inputs, write_cohort
from jepa_ray.data.transform import transform_batch
from jepa_ray.eval.probes import cv_latent_r2
from jepa_ray.model.jepa import JEPA, embedding_stats

FACTORS = ("cardiac", "lung", "frailty")
SEEDS = (0, 1)
STEPS = 300


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, ray_session):
    """200 subjects (about 290 radiographs) in 64 px training shards, with their true latents."""
    root = tmp_path_factory.mktemp("learning")
    write_cohort(root / "cohort", SynthConfig(subjects=200, seed=3, min_size=96, max_size=160))
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
    subjects = [json.loads(samples[k]["meta"])["subject"] for k in keys]
    return split, samples, keys, subjects, np.array([truth[s] for s in subjects], float)


def test_pretraining_beats_random_init_on_a_latent_factor_probe(cohort):
    split, samples, keys, subjects, z = cohort
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

    def embed(model) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            x = np.concatenate([model.encode(b, "image")["pooled"].numpy() for b in batches])
        model.train()
        return x

    random_r2, trained_r2 = [], []
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = JEPA(split.spec.model_dims(cfg), ModelConfig(preset="tiny"))
        random_r2.append(cv_latent_r2(embed(model), z, subjects))
        losses = train_on_samples(model, samples, split.spec, cfg, STEPS, batch=32, seed=seed)
        assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
        x = embed(model)
        stats = embedding_stats(torch.from_numpy(x))
        assert stats["std"] > 0.05 and stats["rankme"] > 5  # no collapse of the pooled embedding
        trained_r2.append(cv_latent_r2(x, z, subjects))
    random_mean, trained_mean = np.mean(random_r2, 0), np.mean(trained_r2, 0)
    report = "  ".join(
        f"{f} {a:+.3f} -> {b:+.3f}" for f, a, b in zip(FACTORS, random_mean, trained_mean, strict=True)
    )
    lung = FACTORS.index("lung")
    # measured here: lung -0.036 -> +0.192 (one seed +0.01, the other +0.38: single seeds vary a lot,
    # hence the mean of two); cardiac -0.05 -> +0.02, frailty -0.04 -> -0.09
    assert trained_mean[lung] > random_mean[lung] + 0.08, report
