"""Is pretraining worth its compute? The JEPA against its random init, a reconstruction objective
(MAE) at the same budget and the raw-input ceiling, read out the ways the field reads them.

Cohort: --subjects synthetic subjects (default 1,600) over 4 sites; the 4th site is held out as the
`external` split, the rest split by subject into train / val / test (75 / 10 / 15%). 64 px shards,
32 px model input, 8 px patches (4 x 4 tokens), the tiny model (64 wide, 2 deep).

Arms, per seed (each seed draws another initialisation and batch order; jepa and mae start from
the same encoder weights and see the same batches and masks):
  random  the encoder at its initialisation
  jepa    --steps single-process steps of `jepa_ray.model.optim.train_step` on the training split
  mae     the same steps with model.objective=mae (same encoder, masks and batches; a decoder
          reconstructs normalised pixels and EHR content instead of predicting target latents)
  raw     the input itself: 8 x 8-pooled pixels (linear, kNN), every pixel (grid), or the 16 pixel
          patches (attentive)

Read-outs of the latent factors the images were drawn from (cardiac: heart width; lung: opacities
and fluid; frailty: bone density; mass: a lung mass's diameter, which no EHR value follows and which
raises the hazard of death), out-of-fold R² over the training split's images, folds grouped
by subject: linear (ridge on the mean-pooled target-encoder tokens), grid (ridge on the 16 patch
tokens concatenated in grid order: a linear read-out with a weight of its own for every position,
which reads a factor spread thinly over many patches, as bone density over ribs and spine, that
pooling averages away; on the raw input, the ridge on every pixel, the raw-pixel ceiling),
attentive (a cross-attention pooling head trained on the frozen patch tokens,
`jepa_ray.eval.attentive`), kNN (cosine, k=20, on the pooled embedding). Downstream, on held-out subjects (one study per subject, as `evaluate`):
image -> EHR retrieval recall@5 on the test split against its chance level, and Cox heads under
every fusion strategy (Harrell's c-index on test and external, fit on train, stopped on val, or
with --survival-stopping committee fit on train and val as committees of --head-seeds members; again
on their subjects with both modalities, where every strategy reads the same subjects). With more
than one --downstream-arms, `cindex_over_seeds`: the JEPA's c-index minus each other arm's,
averaged over seeds, with the interval of 1,000 resamples of the held-out subjects (every seed
is scored on the same subjects, so only resampling them says whether a lead is beyond noise).
With --cross-fit K, the image, EHR and late-fusion heads, the raw-EHR Cox model and the image head
fused with it are also cross-fitted over the internal site's every labelled subject (split
internal_cv; ~800 with both modalities against the test split's ~120), and `cross_fit_over_seeds`
sets late fusion against each single head, the image head with the raw-EHR model against that
model alone, and the JEPA against each other arm there, pairs counted within a fold.
With the downstream part, two bounds: what a small supervised CNN reads of each latent from the
same pixels (`supervised_ceiling`), and the fusion margin an image read-out of a given R² allows
(`fusion_bound`: the true latents blurred to that R² beside the raw EHR, ridge Cox).

Headline: `ratio` = the share of (seed, factor) cells in which the JEPA's attentive-probe R² beats
both its random init and the MAE; the target 1.0 means every factor in every seed. Beside it, the
paired test: every read-out's 95% interval per seed (`ci95`), the JEPA minus each baseline on the
same out-of-fold predictions per seed (`paired`) and averaged over seeds (`paired_over_seeds`),
1,000 bootstrap resamples of the training subjects, each with all its images; `beyond_noise` is
the share of cells where the JEPA beats both with intervals above zero. benchmarks/README.md
reports every other figure beside them, with its spread over seeds.

    python benchmarks/bench_learning.py [--quick] [--subjects N] [--steps S] [--seeds K] [--lr LR] [--set K=V] [--read-context] [--cross-fit K] [--survival-stopping val|committee] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import hardware

os.environ.setdefault("JEPA_RAY_SALT", "benchmark-salt-not-secret-0123456789abcdef")
TARGET = 1.0  # JEPA attentive R² above random init and MAE in every (seed, factor) cell
FACTORS = ("cardiac", "lung", "frailty", "mass")
ARMS = ("random", "jepa", "mae")
READOUTS = ("linear", "grid", "attentive", "knn")
BOOTSTRAP = 1000  # subject resamples behind every interval
EXTERNAL_SITE = "Oristell University Hospital"  # the 4th synthetic site
SPLITS = ("train", "val", "test", "external")
RETRIEVAL_K = 5
FUSION = ("late_fusion", "contrastive", "cross_attention", "co_attention")
UNIMODAL = ("image", "ehr")
PAIRED = ("test_paired", "external_paired")  # their subjects with both modalities (`with_paired`)


def cohort(work: Path, subjects: int, synth: list[str] = ()) -> Path:
    """Synthetic cohort -> 64 px shards with train / val / test / external splits. `synth`: cohort
    settings over the benchmark's (synth.K=V); a cohort already in `work` is reused as it is."""
    import ray

    from jepa_ray.config import load_config
    from jepa_ray.ingest.prepare import prepare
    from jepa_ray.synth.cohort import cohort_inputs, write_cohort

    if not (work / "cohort" / "latents.parquet").exists():
        base = [
            f"synth.subjects={subjects}",
            "synth.seed=3",
            "synth.sites=4",
            "synth.min_size=128",
            "synth.max_size=256",
        ]
        write_cohort(work / "cohort", load_config(overrides=[*base, *synth]).synth)
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        overrides = [
            "prepare.image.size=64",
            "prepare.shards.max_samples=64",
            "prepare.split.val=0.1",
            "prepare.split.test=0.15",
            f'prepare.split.external_sites=["{EXTERNAL_SITE}"]',
        ]
        result = prepare(
            str(shards), load_config(overrides=overrides).prepare, **cohort_inputs(work / "cohort")
        )
        ray.shutdown()
        if not result.ok:
            raise SystemExit("prepare failed: " + "; ".join(result.problems))
    return shards


def load_split(shards: Path, name: str, cfg):
    """(spec, key -> raw sample) of one split."""
    from jepa_ray.stream.local import read_samples
    from jepa_ray.stream.pipeline import open_split

    split = open_split(str(shards), name)
    samples: dict = {}
    for p in split.paths:
        samples.update(read_samples(p))
    return split.spec, samples


def batches_of(samples: dict, keys: list[str], spec, cfg, size: int = 128) -> list[dict]:
    """Evaluation batches (no augmentation, the evaluation's masks) of these samples."""
    from jepa_ray.stream.local import raw_batch
    from jepa_ray.stream.pipeline import collate
    from jepa_ray.stream.transform import transform_batch

    return [
        collate(
            transform_batch(
                raw_batch({k: samples[k] for k in keys[i : i + size]}), spec, cfg, train=False, epoch=0
            )
        )
        for i in range(0, len(keys), size)
    ]


def image_views(model, batches: list[dict], encoder: str = "target") -> tuple[np.ndarray, np.ndarray]:
    """Pooled (N, D) and patch tokens (N, P, D) of the target (or context) encoder seeing the image
    only."""
    import torch

    model.eval()
    pooled, tokens = [], []
    with torch.no_grad():
        for b in batches:
            out = model.encode(b, "image", encoder)
            pooled.append(out["pooled"].float().numpy())
            tokens.append(out["tokens"][:, 1 : 1 + model.dims.patches].float().numpy())
    model.train()
    return np.concatenate(pooled), np.concatenate(tokens)


def raw_views(batches: list[dict], patch: int) -> tuple[np.ndarray, np.ndarray]:
    """The input's own read-outs: 8 x 8 average-pooled pixels (N, 64), pixel patches with a one-hot
    of their grid position (N, P, p*p + P)."""
    import torch.nn.functional as F

    from jepa_ray.model.mae import patchify

    pooled = np.concatenate([F.adaptive_avg_pool2d(b["image"], 8).flatten(1).numpy() for b in batches])
    patches = np.concatenate([patchify(b["image"], (patch, patch)).numpy() for b in batches])
    # raw patches carry no position of their own (encoder tokens have sin-cos positions added):
    # each gets a one-hot of its place in the grid, so the attentive probe can tell them apart
    where = np.broadcast_to(
        np.eye(patches.shape[1], dtype=patches.dtype), (len(patches), *[patches.shape[1]] * 2)
    )
    return pooled, np.concatenate([patches, where], axis=-1)


def oof_knn(x: np.ndarray, z: np.ndarray, groups: list, k: int = 20, folds: int = 5) -> np.ndarray:
    """Out-of-fold predictions (N, F) of a cosine kNN regression (mean of the k nearest), folds grouped."""
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    knn = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=k, metric="cosine"))
    return np.asarray(cross_val_predict(knn, x, z, groups=groups, cv=GroupKFold(folds)), float)


def oof_readouts(
    pooled: np.ndarray,
    tokens: np.ndarray,
    z: np.ndarray,
    groups: list,
    seed: int,
    probe_seeds: int = 1,
    per_factor: bool = False,
) -> dict[str, np.ndarray]:
    """{readout: out-of-fold predictions (N, F, fits)}: one fit of each ridge and of kNN, `probe_seeds`
    fits of the attentive probe (seeds seed * probe_seeds + k): its own initialisation and batch
    order move a faint factor's R² by more than the encoders differ (on the learning cohort's seed-2
    encoders, the mass: 0.215-0.248 at random init over three probe seeds). One probe reads every
    factor (its query, values and epochs shared, chosen by their summed loss), or with `per_factor`
    one probe per factor (V-JEPA's evaluation: a probe per task)."""
    from jepa_ray.eval.attentive import oof_attentive
    from jepa_ray.eval.probes import oof_latent

    def attentive_fit(s: int) -> np.ndarray:
        if not per_factor:
            return oof_attentive(tokens, z, groups, seed=s)
        return np.concatenate(
            [oof_attentive(tokens, z[:, j : j + 1], groups, seed=s) for j in range(z.shape[1])], 1
        )

    attentive = [attentive_fit(seed * probe_seeds + k) for k in range(probe_seeds)]
    return {
        "linear": oof_latent(pooled, z, groups)[..., None],
        "grid": oof_latent(tokens.reshape(len(tokens), -1), z, groups)[..., None],
        "attentive": np.stack(attentive, -1),
        "knn": oof_knn(pooled, z, groups)[..., None],
    }


def subject_resamples(groups: list, n: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(n, N) counts of each image in n bootstrap resamples of the subjects (each drawn subject
    brings all its images: one subject's images are not independent samples)."""
    from jepa_ray.eval.probes import bootstrap_indices

    draws = bootstrap_indices(len(groups), n, seed, groups=groups)
    return np.stack([np.bincount(d, minlength=len(groups)) for d in draws]).astype(float)


def once_each(n: int) -> np.ndarray:
    """The resample of every image once (1, n): its R² is the R² itself."""
    return np.ones((1, n))


def resampled_r2(z: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, F) R² per resample (rows of `weights`) and factor of predictions (N, F, fits), averaged
    over the fits."""
    from jepa_ray.eval.compare import r2_weighted

    return np.stack(
        [
            np.mean([r2_weighted(z[:, j], pred[:, j, k], weights) for k in range(pred.shape[2])], axis=0)
            for j in range(z.shape[1])
        ],
        axis=1,
    )


def scores(preds: dict[str, np.ndarray], z: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """{readout: {factor: out-of-fold R²}} of `oof_readouts` (the attentive probe's R² averaged over
    its fits, each fit's kept too); with resample `weights`, {"ci95": {readout: {factor: [lo, hi]}}}
    beside them."""

    def r2(pred: np.ndarray) -> list[float]:
        return [float(v) for v in resampled_r2(z, pred, once_each(len(z)))[0]]

    out: dict = {r: dict(zip(FACTORS, r2(p), strict=True)) for r, p in preds.items()}
    fits = preds["attentive"].shape[2]
    if fits > 1:
        out["attentive_per_probe_seed"] = [
            dict(zip(FACTORS, r2(preds["attentive"][..., k : k + 1]), strict=True)) for k in range(fits)
        ]
    if weights is not None:
        out["ci95"] = {
            r: {f: [float(v) for v in np.percentile(b[:, j], [2.5, 97.5])] for j, f in enumerate(FACTORS)}
            for r, p in preds.items()
            for b in [resampled_r2(z, p, weights)]
        }
    return out


def paired(pairs: list[tuple[dict, dict]], z: np.ndarray, weights: np.ndarray) -> dict:
    """{readout: {factor: {"difference", "ci95", "beyond_noise"}}}: R² of encoder a minus encoder b
    on the same images, averaged over `pairs` (one per seed, or one), with the 95% interval of the
    same subject resamples (`subject_resamples`) for every pair: over seeds, the interval of the
    mean difference, the subjects drawn once for all seeds."""

    def diff(w: np.ndarray, r: str) -> np.ndarray:
        return np.mean([resampled_r2(z, a[r], w) - resampled_r2(z, b[r], w) for a, b in pairs], axis=0)

    out: dict = {}
    for r in pairs[0][0]:
        d, point = diff(weights, r), diff(once_each(len(z)), r)[0]
        out[r] = {}
        for j, f in enumerate(FACTORS):
            lo, hi = np.percentile(d[:, j], [2.5, 97.5])
            out[r][f] = {
                "difference": float(point[j]),
                "ci95": [float(lo), float(hi)],
                "beyond_noise": bool(lo > 0 or hi < 0),
            }
    return out


def paired_cells(by_factor: dict) -> str:
    """One line of `paired` differences: each factor's with its interval, * when beyond noise."""
    return "  ".join(
        f"{f} {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        + ("*" if d["beyond_noise"] else " ")
        for f, d in by_factor.items()
    )


def readouts(
    pooled: np.ndarray,
    tokens: np.ndarray,
    z: np.ndarray,
    groups: list,
    seed: int,
    probe_seeds: int = 1,
    per_factor: bool = False,
) -> dict:
    """{readout: {factor: out-of-fold R²}} (`oof_readouts`, `scores`)."""
    return scores(oof_readouts(pooled, tokens, z, groups, seed, probe_seeds, per_factor), z)


def held_splits(held: dict, model=None) -> dict:
    """One study per subject of each held split (as `evaluate` picks them): the encoder's embeddings
    when `model` is given, else the raw input (8 x 8-pooled pixels as `raw_image`), beside the EHR
    arrays."""
    import torch

    from jepa_ray.eval.embed import EHR_ARRAYS, embed_batch
    from jepa_ray.eval.evaluate import one_per_subject

    if model is not None:
        model.eval()
    splits = {}
    for name, batches in held.items():
        cols: dict[str, list] = {}
        with torch.no_grad():
            for b in batches:
                if model is not None:
                    out = {
                        k: v.float().numpy() if v.is_floating_point() else v.numpy()
                        for k, v in embed_batch(model, b, 4).items()
                    }
                    # the target tokenizer's tokens of the static features' slots (`embedding_cox`)
                    n_static = model.dims.n_num + len(model.dims.cat_sizes)
                    out["ehr_tokenizer_static"] = (
                        model.target.ehr(b)[0][:, :n_static].flatten(1).float().numpy()
                    )
                else:
                    pooled = torch.nn.functional.adaptive_avg_pool2d(b["image"].float(), 8)
                    out = {
                        "raw_image": pooled.flatten(1).numpy(),
                        "has_image": b["has_image"].numpy(),
                        "has_ehr": b["has_ehr"].numpy(),
                    }
                out |= {k: b[k].numpy() for k in EHR_ARRAYS}
                for k, v in out.items():
                    cols.setdefault(k, []).append(v)
                cols.setdefault("meta", []).append(np.array(b["meta"], dtype=object))
                cols.setdefault("key", []).append(np.array(b["key"], dtype=object))
        splits[name] = one_per_subject({k: np.concatenate(v) for k, v in cols.items()})
    if model is not None:
        model.train()
    return splits


def mapped_recall(x: dict, y: dict, both: dict) -> dict:
    """Recall@5 on test and external of a ridge map fit on train from x to y (rows with both
    modalities; an x wider than 128 values through its principal components, as `evaluate`)."""
    from jepa_ray.eval.probes import linear_map_recall

    return linear_map_recall(
        {k: x[k][both[k]] for k in both},
        {k: y[k][both[k]] for k in both},
        "train",
        ["test", "external"],
        [RETRIEVAL_K],
    )


def raw_retrieval(held: dict, manifest: dict) -> dict:
    """The raw-input ceiling of image -> EHR retrieval: a ridge from 8 x 8-pooled pixels to the raw
    EHR features (the Cox baseline's), fit on train, recall@5 of the true partner on test."""
    from jepa_ray.eval.features import raw_ehr_features

    splits = held_splits({k: held[k] for k in ("train", "test", "external")})
    ehr = raw_ehr_features(splits, manifest, "train")
    both = {k: s.cols["has_image"].astype(bool) & s.cols["has_ehr"].astype(bool) for k, s in splits.items()}
    return mapped_recall({k: s.cols["raw_image"] for k, s in splits.items()}, ehr, both)


def followed_pairs(held: dict, manifest: dict, truth: dict) -> dict:
    """The held subjects with both modalities and follow-up, per split: their (time, event) of
    death, raw EHR features (the Cox baseline's, imputed with the training split's statistics),
    8 x 8-pooled pixels and true latents: what the raw-input fusion ceiling and bound read."""
    from jepa_ray.eval.features import raw_ehr_features

    splits = held_splits(held)
    ehr = raw_ehr_features(splits, manifest, "train")
    out = {}
    for k, sp in splits.items():
        time, event = sp.tte("death")
        rows = sp.cols["has_image"].astype(bool) & sp.cols["has_ehr"].astype(bool)
        rows &= ~np.isnan(time) & (time > 0)
        out[k] = {
            "tte": (time[rows], event[rows]),
            "ehr": ehr[k][rows],
            "image": sp.cols["raw_image"][rows],
            "latents": np.array([truth[m["subject"]] for m in sp.meta], float)[rows],
        }
    return out


def ridge_cox(pairs: dict, x: dict) -> tuple[np.ndarray, dict]:
    """Harrell test / external of a ridge Cox model (`RidgeCox`) fit on train's design x["train"]
    (rows as `followed_pairs`), and its risk on every split."""
    from jepa_ray.eval.survival import RidgeCox, harrell

    model = RidgeCox(x["train"], *pairs["train"]["tte"])
    risk = {k: model.risk(v) for k, v in x.items()}
    return np.array([harrell(*pairs[s]["tte"], risk[s]) for s in ("test", "external")]), risk


def raw_fusion(pairs: dict) -> dict:
    """The raw-input ceiling of fusion: ridge Cox heads (the raw baseline's, `RidgeCox`) fit on the
    training split's subjects with both modalities (`followed_pairs`), on raw EHR features,
    8 x 8-pooled pixels, both concatenated, and the true latents (the oracle), Harrell's c-index on
    test and external."""
    designs = {
        "ehr": lambda p: p["ehr"],
        "image": lambda p: p["image"],
        "ehr+image": lambda p: np.concatenate([p["ehr"], p["image"]], 1),
        "latents": lambda p: p["latents"],
    }
    out: dict = {}
    for name, x in designs.items():
        c, _ = ridge_cox(pairs, {k: x(p) for k, p in pairs.items()})
        out[name] = {"test": float(c[0]), "external": float(c[1])}
    out["fusion_margin"] = {
        split: out["ehr+image"][split] - max(out["ehr"][split], out["image"][split])
        for split in ("test", "external")
    }
    return out


def supervised_ceiling(held: dict, truth: dict, seeds: int = 2, epochs: int = 40) -> dict:
    """What the pixels hold when labels are given: a small CNN (stride-2 convolutions, 32-128
    channels) trained on the training split's images to regress the four latents, R² per factor
    on the test split's images, per CNN seed. Above the raw-input probes (linear maps of pixels),
    it says how far an encoder's frozen read-out could still rise."""
    import torch
    from torch import nn

    def images(batches):  # the studies with an image, and their subjects' latents
        x, z = [], []
        for b in batches:
            on = b["has_image"].bool()
            x.append(b["image"].float()[on])
            z += [
                truth[json.loads(m)["subject"]]
                for m, keep in zip(b["meta"], on.tolist(), strict=True)
                if keep
            ]
        return torch.cat(x), torch.tensor(z, dtype=torch.float32)

    (x, z), (xt, zt) = images(held["train"]), images(held["test"])
    mu, sd = z.mean(0), z.std(0)
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        layers, c, size = [nn.Conv2d(x.shape[1], 32, 3, padding=1), nn.GELU()], 32, x.shape[-1]
        while size > 4:
            layers += [nn.Conv2d(c, min(2 * c, 128), 3, stride=2, padding=1), nn.GELU()]
            c, size = min(2 * c, 128), size // 2
        net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, len(FACTORS)))
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(64):
                loss = ((net(x[idx]) - (z[idx] - mu) / sd) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            pred = net.eval()(xt) * sd + mu
        r2 = 1 - ((pred - zt) ** 2).sum(0) / ((zt - zt.mean(0)) ** 2).sum(0)
        out.append(dict(zip(FACTORS, map(float, r2), strict=True)))
    return {"per_seed": out, "mean": {f: float(np.mean([o[f] for o in out])) for f in FACTORS}}


def read_at(z: np.ndarray, r2: float, rng: np.random.Generator) -> np.ndarray:
    """A read-out of a standardised latent `z` whose R² against it is `r2` (in expectation):
    sqrt(r2) z plus independent noise of variance 1 - r2."""
    r2 = float(np.clip(r2, 0.0, 1.0))
    return np.sqrt(r2) * z + np.sqrt(1 - r2) * rng.standard_normal(len(z))


def fusion_bound(pairs: dict, r2: dict[str, dict], reps: int = 20) -> dict:
    """The fusion margin an image read-out of given quality allows. For each named set of R²
    (factor -> R²), an idealised image read-out (`read_at` of each true latent) under a ridge Cox
    model (the hazard is log-linear in the latents, so this is the right model), beside the raw
    EHR features' ridge Cox, and fused: the better per split of one ridge Cox on both designs and
    of late fusion (a Cox model on the two models' risks), as the benchmark takes the best fusion
    strategy. Harrell test / external on subjects with both modalities (`followed_pairs`),
    averaged over `reps` draws of the read-out noise, and the margin of the fusion over the better
    unimodal model."""
    ehr = {k: p["ehr"] for k, p in pairs.items()}
    alone, ehr_risk = ridge_cox(pairs, ehr)
    out: dict = {"ehr": dict(zip(("test", "external"), map(float, alone), strict=True))}
    for name, quality in r2.items():
        got = []
        for rep in range(reps):
            rng = np.random.default_rng(rep)
            img = {
                k: np.stack([read_at(p["latents"][:, j], quality[f], rng) for j, f in enumerate(FACTORS)], 1)
                for k, p in pairs.items()
            }
            image, img_risk = ridge_cox(pairs, img)
            joint, _ = ridge_cox(pairs, {k: np.concatenate([ehr[k], img[k]], 1) for k in pairs})
            late, _ = ridge_cox(pairs, {k: np.stack([ehr_risk[k], img_risk[k]], 1) for k in pairs})
            both = np.maximum(joint, late)
            got.append(np.concatenate([image, both, both - np.maximum(alone, image)]))
        m = np.mean(got, axis=0)
        out[name] = {
            "r2": {f: float(quality[f]) for f in FACTORS},
            **{
                part: {"test": float(m[2 * i]), "external": float(m[2 * i + 1])}
                for i, part in enumerate(("image", "fusion", "margin"))
            },
        }
    return out


def downstream(
    model,
    held: dict,
    manifest: dict,
    seed: int,
    head_seeds: int = 1,
    cross_fit: int = 0,
    stopping: str = "val",
) -> dict:
    """Retrieval recall@5 (test: the predictor's image -> EHR prediction; test and external: a ridge
    map fit on train to the raw EHR features from the pooled image embedding (`mapped`) and from
    the 4 x 4 grid of patch tokens (`mapped_tokens`, `evaluate`'s linear read-out)) and Cox c-index
    per strategy (test, external and their subjects with both modalities, `with_paired`; each head
    the mean of `head_seeds` fits, stopped as `stopping` says (`evaluate_survival`)) of one
    encoder; under "risks" each strategy's {split: (rows, time, event, risk)}, for
    `cindex_over_seeds` (not for the JSON). With
    `cross_fit` K: the image, EHR and late-fusion heads, the raw-EHR Cox model and the image head
    fused with it cross-fitted over the internal site's train, val and test subjects in K folds
    (`survival.cross_fitted`), scored on those with both
    modalities as split "internal_cv", their risks under "cross_fit" (for `cross_fit_over_seeds`)."""
    from jepa_ray.eval.features import fusion_inputs, raw_ehr_features
    from jepa_ray.eval.probes import recall_at
    from jepa_ray.eval.survival import cross_fitted, evaluate_survival, harrell, with_paired

    splits = held_splits(held, model)
    test = splits["test"]
    both = test.cols["has_image"].astype(bool) & test.cols["has_ehr"].astype(bool)
    retrieval = recall_at(test.cols["q_img2ehr"][both], test.cols["g_ehr"][both], [RETRIEVAL_K])
    ehr = raw_ehr_features(splits, manifest, "train")
    pair = {
        k: splits[k].cols["has_image"].astype(bool) & splits[k].cols["has_ehr"].astype(bool)
        for k in ("train", "test", "external")
    }
    retrieval["mapped"] = mapped_recall({k: splits[k].cols["emb_image"] for k in pair}, ehr, pair)
    retrieval["mapped_tokens"] = mapped_recall(
        {k: splits[k].cols["img_tokens"].reshape(len(splits[k]), -1) for k in pair}, ehr, pair
    )
    inputs, raw = with_paired(
        {k: fusion_inputs(s, "death") for k, s in splits.items()}, ehr, ("test", "external")
    )
    surv = evaluate_survival(
        inputs,
        raw=raw,
        fit_split="train",
        val_split="val",
        report_splits=("test", "external", *PAIRED),
        bootstrap=0,
        seed=seed,
        head_seeds=head_seeds,
        keep_risks=True,
        stopping=stopping,
    )
    risks = {
        strategy: {
            split: (rows, inputs[split].time[rows], inputs[split].event[rows], r)
            for split, (rows, r) in by.items()
        }
        for strategy, by in surv["risks"].items()
    }
    cindex = {
        strategy: {split: r.get("harrell") for split, r in by_split.items()}
        for strategy, by_split in surv["cindex"].items()
    }
    out = {"retrieval": retrieval, "cindex": cindex, "risks": risks}
    if cross_fit:
        cf = out["cross_fit"] = cross_fitted(
            {k: inputs[k] for k in SPLITS[:3]},
            folds=cross_fit,
            seed=seed,
            head_seeds=head_seeds,
            stopping=stopping,
            raw={k: raw[k] for k in SPLITS[:3]},
        )
        n_static = model.dims.n_num + len(model.dims.cat_sizes)
        has_ehr = {k: inputs[k].has_ehr for k in SPLITS[:3]}
        for read in [r for r in EMBEDDING_READS if n_static or "static" not in r]:  # a layout with statics
            features = {
                k: embedding_features(inputs[k], read, n_static, splits[k].cols.get("ehr_tokenizer_static"))
                for k in SPLITS[:3]
            }
            cf["risks"][read] = embedding_cox(cf, features, has_ehr)
        p = cf["paired"]
        for strategy, risk in cf["risks"].items():
            cindex.setdefault(strategy, {})["internal_cv"] = harrell(
                cf["time"][p], cf["event"][p], risk[p], cf["fold"][p]
            )
    return out


EMBEDDING_ALPHAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
# what `embedding_cox` reads of the EHR encoder's output, per subject
EMBEDDING_READS = {
    "ehr_embedding_cox": "the pooled embedding (the mean of the kept EHR tokens, as the EHR head reads)",
    "ehr_embedding_count_cox": "the pooled embedding and the log of how many EHR tokens were kept",
    "ehr_meanmax_count_cox": "the mean and the maximum of the kept EHR tokens and their log count",
    "ehr_static_slots_cox": "the encoder's tokens of the static features' slots, side by side",
    "ehr_tokenizer_static_cox": "the tokenizer's tokens of those slots, before the encoder",
}


def embedding_features(d, read: str, n_static: int = 0, tokenizer: np.ndarray | None = None) -> np.ndarray:
    """The features `read` (a key of EMBEDDING_READS) of FusionInputs `d`, one row per subject;
    `n_static`: how many static-feature slots lead the EHR layout; `tokenizer`: the tokenizer's
    (n, n_static * D) tokens of those slots."""
    if read == "ehr_embedding_cox":
        return d.ehr_pooled
    if read == "ehr_static_slots_cox":
        return d.ehr_tokens[:, :n_static].reshape(len(d.ehr_tokens), -1)
    if read == "ehr_tokenizer_static_cox":
        return tokenizer
    count = np.log1p(d.ehr_keep.sum(1, keepdims=True).astype(float))
    if read == "ehr_embedding_count_cox":
        return np.concatenate([d.ehr_pooled, count], 1)
    kept = np.where(d.ehr_keep[..., None], d.ehr_tokens, -np.inf).max(1)
    return np.concatenate([d.ehr_pooled, np.where(np.isfinite(kept), kept, 0.0), count], 1)


def embedding_cox(cf: dict, features: dict, has_ehr: dict) -> np.ndarray:
    """Out-of-fold risks of a ridge Cox model on `features` ({split: (n, F)}, `embedding_features`
    of the splits `cf` pooled; `has_ehr`: {split: (n,) bool}), on the folds of `cf`
    (`survival.cross_fitted`'s result), each fold's model fit to the optimum of its partial
    likelihood on the other folds' subjects with EHR, its penalty the best of EMBEDDING_ALPHAS by an
    inner 3-fold c-index; NaN where a subject has no EHR. Beside the EHR head (a linear Cox layer on
    the standardised pooled embedding, trained by Adam and stopped early) and the raw-EHR Cox model:
    whether the head, the pooling, the encoder or the tokenizer loses what the raw features read."""
    pairs = list(zip(cf["origin"], cf["row"], strict=True))
    x = np.stack([features[o][r] for o, r in pairs])
    has = np.array([has_ehr[o][r] for o, r in pairs], bool)
    return out_of_fold_cox(x, cf["time"], cf["event"], cf["fold"], has, EMBEDDING_ALPHAS)


def out_of_fold_cox(
    x: np.ndarray, time_: np.ndarray, event: np.ndarray, fold: np.ndarray, rows: np.ndarray, alphas
) -> np.ndarray:
    """Each fold's risks from a ridge Cox model (its penalty the best of `alphas` by an inner
    c-index) fit on the other folds, all on the `rows` (bool mask); NaN elsewhere."""
    from jepa_ray.eval.fewlabel import ridge_cox

    risk = np.full(len(x), np.nan)
    for k in np.unique(fold):
        fit, scored = rows & (fold != k), rows & (fold == k)
        model = ridge_cox(x[fit], time_[fit], event[fit], alphas)
        risk[scored] = model(x[scored])
    return risk


def cindex_over_seeds(seed_risks: list[dict], others: list[str]) -> dict:
    """{"jepa-<other>": {strategy: {split: paired_cindex}}}: the JEPA's c-index minus another arm's,
    averaged over seeds, with the 95% interval of BOOTSTRAP resamples of the held-out subjects, each
    resample scoring every seed's heads of both arms. Every seed is scored on the same subjects, so
    the seeds' agreement alone does not average over the draw of those subjects; this interval does.
    seed_risks: per seed, {arm: `downstream`'s "risks"}."""
    from jepa_ray.eval.survival import paired_cindex

    out: dict = {}
    for other in others:
        res: dict = {}
        for strategy, by_split in seed_risks[0]["jepa"].items():
            for split in by_split:
                runs = [
                    (r["jepa"][strategy][split], r[other].get(strategy, {}).get(split)) for r in seed_risks
                ]
                rows = runs[0][0][0]
                if any(
                    b is None or not (np.array_equal(a[0], rows) and np.array_equal(b[0], rows))
                    for a, b in runs
                ):
                    continue  # not the same subjects in every seed and arm: nothing to pair
                _, time, event, _ = runs[0][0]
                a, b = np.stack([a[3] for a, _ in runs]), np.stack([b[3] for _, b in runs])
                res.setdefault(strategy, {})[split] = paired_cindex(time, event, a, b, BOOTSTRAP, 0)
        out[f"jepa-{other}"] = res
    return out


def cross_fit_over_seeds(seed_cf: list[dict]) -> dict:
    """Over seeds, on the internal site's cross-fitted subjects with both modalities (every seed
    and arm on the same folds): late fusion minus each unimodal head per arm
    ({"late_fusion-unimodal": {arm: {unimodal: ...}}}), and the JEPA minus each other arm per
    strategy ({"jepa-<other>": {strategy: ...}}); where the raw-EHR Cox model was cross-fitted too,
    the image head fused with it minus it per arm ({"image_with_raw_ehr-raw_ehr_cox": {arm: ...}});
    where `embedding_cox` was, the EHR head minus its read of the pooled embedding and each of its
    reads minus the raw-EHR Cox model per arm;
    means over seeds with the interval of BOOTSTRAP resamples of the
    subjects, pairs counted within a fold. seed_cf: per seed, {arm: `downstream`'s "cross_fit"}."""
    from jepa_ray.eval.survival import paired_cindex

    first = seed_cf[0][next(iter(seed_cf[0]))]
    p = first["paired"]
    time, event, fold = first["time"][p], first["event"][p], first["fold"][p]
    for by_arm in seed_cf:
        for cf in by_arm.values():
            if not (np.array_equal(cf["fold"], first["fold"]) and np.array_equal(cf["time"], first["time"])):
                raise ValueError("cross-fitted risks over seeds must share their subjects and folds")

    def runs(arm: str, strategy: str) -> np.ndarray:
        return np.stack([by_arm[arm]["risks"][strategy][p] for by_arm in seed_cf])

    def diff(arm_a: str, strategy_a: str, arm_b: str, strategy_b: str) -> dict:
        a, b = runs(arm_a, strategy_a), runs(arm_b, strategy_b)
        return paired_cindex(time, event, a, b, BOOTSTRAP, 0, strata=fold)

    arms = list(seed_cf[0])
    out: dict = {
        "late_fusion-unimodal": {arm: {u: diff(arm, "late_fusion", arm, u) for u in UNIMODAL} for arm in arms}
    }
    if "image_with_raw_ehr" in first["risks"]:  # the image head's worth to the classical EHR model
        out["image_with_raw_ehr-raw_ehr_cox"] = {
            arm: diff(arm, "image_with_raw_ehr", arm, "raw_ehr_cox") for arm in arms
        }
    if "ehr_embedding_cox" in first["risks"]:  # the EHR head against the optimum on its embedding
        out["ehr-ehr_embedding_cox"] = {arm: diff(arm, "ehr", arm, "ehr_embedding_cox") for arm in arms}
        for read in [r for r in EMBEDDING_READS if r in first["risks"] and "raw_ehr_cox" in first["risks"]]:
            out[f"{read}-raw_ehr_cox"] = {arm: diff(arm, read, arm, "raw_ehr_cox") for arm in arms}
    for other in [a for a in arms if a != "jepa"] if "jepa" in arms else []:
        out[f"jepa-{other}"] = {s: diff("jepa", s, other, s) for s in first["risks"]}
    return out


def differences(tree: dict, path: str = ""):
    """(path, paired difference) of every `paired_cindex` result in a nested dict of them, the
    path its keys joined by spaces."""
    for key, value in tree.items():
        name = f"{path} {key}".strip()
        if "difference" in value:
            yield name, value
        else:
            yield from differences(value, name)


def over_chance(r: dict) -> float:
    """Recall@5 over its chance level (NaN where a split had nothing to retrieve)."""
    return r.get(f"recall@{RETRIEVAL_K}", float("nan")) / r.get(f"chance@{RETRIEVAL_K}", float("nan"))


def fusion_margin(cindex: dict, split: str) -> float:
    """Best fusion strategy's c-index minus the best unimodal one's on a split."""
    best = max(cindex[s][split] for s in FUSION if cindex.get(s, {}).get(split) is not None)
    uni = max(cindex[s][split] for s in UNIMODAL if cindex.get(s, {}).get(split) is not None)
    return float(best - uni)


def clinical_margin(cindex: dict, split: str) -> float:
    """The image head fused with the raw-EHR Cox model minus that model alone on a split: what the
    image tokens add to the classical model of the EHR."""
    return float(cindex["image_with_raw_ehr"][split] - cindex["raw_ehr_cox"][split])


def cells_won(runs: list[dict], readout: str) -> list[bool]:
    """Per (seed, factor): the JEPA's R² under `readout` above both random init's and the MAE's."""
    return [
        x["jepa"][readout][f] > max(x["random"][readout][f], x["mae"][readout][f])
        for x in runs
        for f in FACTORS
    ]


def summary(runs: list[dict], ceiling: dict) -> tuple[dict, float, list[str]]:
    """Means and spreads over seeds; the headline ratio; the table's lines."""
    mean = {
        arm: {r: {f: float(np.mean([x[arm][r][f] for x in runs])) for f in FACTORS} for r in READOUTS}
        for arm in ARMS
    }
    sd = {
        arm: {r: {f: float(np.std([x[arm][r][f] for x in runs])) for f in FACTORS} for r in READOUTS}
        for arm in ARMS
    }
    wins = cells_won(runs, "attentive")
    lines = [f"{'R² (mean ± sd over seeds)':<28}" + "".join(f"{f:>20}" for f in FACTORS)]
    for r in READOUTS:
        for arm in ARMS:
            cells = "".join(f"{mean[arm][r][f]:>+13.3f} ± {sd[arm][r][f]:.3f}" for f in FACTORS)
            lines.append(f"{r + ' / ' + arm:<28}{cells}")
        raw = ceiling.get(r)
        if raw is not None:
            lines.append(f"{r + ' / raw input':<28}" + "".join(f"{raw[f]:>+13.3f}        " for f in FACTORS))
    return {"mean": mean, "sd": sd}, float(np.mean(wins)), lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 subjects, 2 seeds, 300 steps, no downstream")
    ap.add_argument("--subjects", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument(
        "--first-seed", type=int, default=0, help="run seeds first .. first + seeds - 1 (default 0)"
    )
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument(
        "--ema", type=float, nargs=2, default=None, help="JEPA EMA momentum start, end (default: the model's)"
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate of the trained arms (default: train.lr's, 1e-3; 3e-3 is what the "
        "label-free sweep of bench_labelfree.py --grid lr picks)",
    )
    ap.add_argument(
        "--mae-lr",
        type=float,
        default=None,
        help="peak learning rate of the MAE arm alone (default: --lr's); of 1e-4 / 3e-4 / 1e-3 the MAE "
        "reads the latents best at 1e-4, where it stays close to its initialisation (benchmarks/README.md)",
    )
    ap.add_argument("--no-downstream", action="store_true", help="skip retrieval and the Cox heads")
    ap.add_argument(
        "--read-context",
        action="store_true",
        help="also read the JEPA arm's context encoder (the one the gradient trained; eval.encoder=context) "
        "beside its EMA target, paired with the target and with random init",
    )
    ap.add_argument(
        "--downstream-arms", nargs="+", default=["jepa"], choices=ARMS, help="arms scored downstream (slow)"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="reuse a cohort and its shards")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pipeline or model setting for every arm, e.g. pipeline.mask.policy.cross_modal=0.5 or "
        "model.sigreg=0.1 (repeatable; model.preset and model.objective are the arm's)",
    )
    ap.add_argument(
        "--synth",
        action="append",
        default=[],
        metavar="synth.KEY=VALUE",
        help="a cohort setting, e.g. synth.mass_contrast=0.9 (repeatable; give a --workdir of its own: "
        "a cohort already written there is reused as it is)",
    )
    ap.add_argument(
        "--probe-seeds",
        type=int,
        default=1,
        help="fits of the attentive probe averaged per encoder (default 1)",
    )
    ap.add_argument(
        "--attentive-per-factor",
        action="store_true",
        help="one attentive probe per factor instead of one reading all four",
    )
    ap.add_argument(
        "--head-seeds",
        type=int,
        default=None,
        help="fits averaged per time-to-event head (default: evaluate's eval.survival_head_seeds, 5)",
    )
    ap.add_argument(
        "--survival-stopping",
        choices=["val", "committee"],
        default="val",
        help="how the time-to-event heads stop early, as evaluate's eval.survival_stopping: on the val "
        "split (default), or committees of --head-seeds members each stopped on its own part of the "
        "subjects they learn from",
    )
    ap.add_argument(
        "--cross-fit",
        type=int,
        default=0,
        metavar="K",
        help="also cross-fit the image, EHR and late-fusion heads over the internal site's train, val "
        "and test subjects in K folds (split internal_cv: ~800 subjects with both modalities, not "
        "the test split's ~120)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    subjects = args.subjects or (1000 if args.quick else 1600)
    steps = args.steps or (300 if args.quick else 600)
    seeds = args.seeds or (2 if args.quick else 3)
    do_downstream = not (args.quick or args.no_downstream)

    import pandas as pd
    import torch

    from jepa_ray.config import EvalConfig, ModelConfig, StorageConfig, load_config
    from jepa_ray.ingest.deid import Pseudonymizer
    from jepa_ray.model.jepa import JEPA, embedding_stats
    from jepa_ray.shards.manifest import read_manifest
    from jepa_ray.storage import Store
    from jepa_ray.train.local import train_on_samples

    head_seeds = args.head_seeds or EvalConfig().survival_head_seeds
    if args.survival_stopping == "committee" and head_seeds < 2:
        raise SystemExit(f"--survival-stopping committee needs --head-seeds of at least 2, got {head_seeds}")
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-learning-"))
    t0 = time.perf_counter()
    bad = [o for o in args.synth if not o.startswith("synth.")]
    if bad:
        raise SystemExit(f"--synth takes synth.KEY=VALUE settings, not {', '.join(bad)}")
    shards = cohort(work, subjects, args.synth)
    loaded = load_config(
        overrides=[
            "pipeline.image_size=32",
            "pipeline.patch_size=8",
            "pipeline.max_events=32",
            *args.overrides,
        ]
    )
    cfg = loaded.pipeline
    lr = args.lr or loaded.train.lr
    model_set = loaded.model.model_dump(exclude_unset=True)  # model.* given with --set
    spec, train = load_split(shards, "train", cfg)
    latents = pd.read_parquet(work / "cohort" / "latents.parquet")
    pz = Pseudonymizer(os.environ["JEPA_RAY_SALT"].encode())
    truth = {pz.subject(r.subject_id): [getattr(r, f) for f in FACTORS] for r in latents.itertuples()}
    keys = [k for k, f in train.items() if "image" in f]
    groups = [json.loads(train[k]["meta"])["subject"] for k in keys]
    z = np.array([truth[s] for s in groups], float)
    probe_batches = batches_of(train, keys, spec, cfg)
    held: dict = {}
    if do_downstream:
        held["train"] = batches_of(train, list(train), spec, cfg)
        for name in SPLITS[1:]:
            _, samples = load_split(shards, name, cfg)
            held[name] = batches_of(samples, list(samples), spec, cfg)
    manifest = read_manifest(Store(str(shards), StorageConfig()))
    setup_s = time.perf_counter() - t0

    raw_pooled, raw_patches = raw_views(probe_batches, cfg.patch_size)
    resamples = subject_resamples(groups)  # the same for every encoder: intervals are paired
    ceiling = scores(
        oof_readouts(raw_pooled, raw_patches, z, groups, 0, args.probe_seeds, args.attentive_per_factor),
        z,
        resamples,
    )
    print(
        "raw input: "
        + "  ".join(f"{r} " + " ".join(f"{v:+.2f}" for v in ceiling[r].values()) for r in READOUTS),
        flush=True,
    )

    retrieval_ceiling = fusion_ceiling = None
    if do_downstream:
        pairs = followed_pairs(held, manifest, truth)
        fusion_ceiling = raw_fusion(pairs)
        print(
            "raw input: Harrell test / external "
            + "  ".join(f"{k} {v['test']:.3f} / {v['external']:.3f}" for k, v in fusion_ceiling.items()),
            flush=True,
        )
        retrieval_ceiling = raw_retrieval(held, manifest)
        print(
            f"raw input: image -> EHR recall@{RETRIEVAL_K} / chance, test {over_chance(retrieval_ceiling['test']):.2f}"
            f"  external {over_chance(retrieval_ceiling['external']):.2f}",
            flush=True,
        )

    runs, seed_preds, seed_risks, seed_cf = [], [], [], []
    for seed in range(args.first_seed, args.first_seed + seeds):
        seed_risks.append({})
        seed_cf.append({})
        run: dict = {"seed": seed}
        models, preds = {}, {}
        for arm in args.arms:
            torch.manual_seed(seed)  # the same encoder initialisation for every arm
            objective = "mae" if arm == "mae" else "jepa"
            model = JEPA(
                spec.model_dims(cfg),
                ModelConfig(
                    **model_set
                    | {"preset": "tiny", "objective": objective}
                    | ({"ema": tuple(args.ema)} if args.ema else {})
                ),
            )
            t = time.perf_counter()
            losses = []
            if arm != "random":
                rate = args.mae_lr if arm == "mae" and args.mae_lr else lr
                losses = train_on_samples(model, train, spec, cfg, steps, lr=rate, batch=32, seed=seed)
            train_s = time.perf_counter() - t
            pooled, tokens = image_views(model, probe_batches)
            preds[arm] = oof_readouts(
                pooled, tokens, z, groups, seed, args.probe_seeds, args.attentive_per_factor
            )
            run[arm] = scores(preds[arm], z, resamples)
            run[arm]["train_s"] = train_s
            run[arm]["rankme"] = embedding_stats(torch.from_numpy(pooled))["rankme"]
            if losses:
                run[arm]["loss_first10"] = float(np.mean(losses[:10]))
                run[arm]["loss_last10"] = float(np.mean(losses[-10:]))
            models[arm] = model
            print(
                f"seed {seed} {arm:<6} "
                + "  ".join(f"{r} " + " ".join(f"{v:+.2f}" for v in run[arm][r].values()) for r in READOUTS)
                + f"  rankme {run[arm]['rankme']:.1f}  ({train_s:.0f} s)",
                flush=True,
            )
        if args.read_context and "jepa" in models:
            pooled, tokens = image_views(models["jepa"], probe_batches, "context")
            preds["jepa_context"] = oof_readouts(
                pooled, tokens, z, groups, seed, args.probe_seeds, args.attentive_per_factor
            )
            run["jepa_context"] = scores(preds["jepa_context"], z, resamples)
            print(
                f"seed {seed} jepa (context encoder) "
                + "  ".join(
                    f"{r} " + " ".join(f"{v:+.2f}" for v in run["jepa_context"][r].values()) for r in READOUTS
                ),
                flush=True,
            )
        if "jepa" in preds:
            run["paired"] = {
                f"jepa-{other}": paired([(preds["jepa"], preds[other])], z, resamples)
                for other in ("random", "mae")
                if other in preds
            }
            if "jepa_context" in preds:
                run["paired"] |= {
                    f"jepa_context-{other}": paired([(preds["jepa_context"], preds[other])], z, resamples)
                    for other in ("jepa", "random")
                    if other in preds
                }
            for name, by_readout in run["paired"].items():
                for r in ("attentive", "grid"):
                    print(f"seed {seed} {name:<11} {r:<9} " + paired_cells(by_readout[r]), flush=True)
        if do_downstream:
            for arm, model in models.items():
                if arm not in args.downstream_arms:
                    continue
                d = run[arm]["downstream"] = downstream(
                    model, held, manifest, seed, head_seeds, args.cross_fit, args.survival_stopping
                )
                seed_risks[-1][arm] = d.pop("risks")
                if args.cross_fit:
                    seed_cf[-1][arm] = d.pop("cross_fit")
                r = d["retrieval"]
                print(
                    f"seed {seed} {arm:<6} recall@{RETRIEVAL_K} / chance: predictor {over_chance(r):.2f},"
                    f" ridge from the pooled embedding {over_chance(r['mapped']['test']):.2f},"
                    f" from the tokens {over_chance(r['mapped_tokens']['test']):.2f}"
                    f" (external {over_chance(r['mapped_tokens']['external']):.2f})"
                    "  fusion - unimodal:"
                    f" test {fusion_margin(d['cindex'], 'test'):+.3f}  external {fusion_margin(d['cindex'], 'external'):+.3f}"
                    " (subjects with both modalities:"
                    f" {fusion_margin(d['cindex'], PAIRED[0]):+.3f} / {fusion_margin(d['cindex'], PAIRED[1]):+.3f})"
                    + (
                        f"  cross-fitted internal {fusion_margin(d['cindex'], 'internal_cv'):+.3f}"
                        if args.cross_fit
                        else ""
                    ),
                    flush=True,
                )
        runs.append(run)
        seed_preds.append(preds)

    stats, ratio, lines = (
        summary([{a: r[a] for a in ARMS} for r in runs], ceiling)
        if set(args.arms) == set(ARMS)
        else ({}, float("nan"), [])
    )
    for line in lines:
        print(line)
    if set(args.arms) == set(ARMS):
        # the paired criterion: the JEPA above both baselines by more than the subject draw explains
        clear = [
            all(
                r["paired"][pair]["attentive"][f]["beyond_noise"]
                and r["paired"][pair]["attentive"][f]["difference"] > 0
                for pair in ("jepa-random", "jepa-mae")
            )
            for r in runs
            for f in FACTORS
        ]
        stats["beyond_noise"] = float(np.mean(clear))
        print(
            f"JEPA attentive R² above random init and MAE beyond noise (paired, subjects resampled, 95%): "
            f"{sum(clear)} of {len(clear)} (seed, factor) cells"
        )
    if "jepa" in args.arms:  # the mean difference over seeds, the same subject resamples for all
        stats["paired_over_seeds"] = {
            f"jepa-{other}": paired([(p["jepa"], p[other]) for p in seed_preds], z, resamples)
            for other in ("random", "mae")
            if other in args.arms
        }
        if args.read_context:
            stats["paired_over_seeds"] |= {
                f"jepa_context-{other}": paired(
                    [(p["jepa_context"], p[other]) for p in seed_preds], z, resamples
                )
                for other in ("jepa", "random")
                if other in args.arms
            }
        for name, by_readout in stats["paired_over_seeds"].items():
            for r in ("attentive", "grid"):
                print(f"mean over seeds {name:<11} {r:<9} " + paired_cells(by_readout[r]))
    results: dict = {
        "runs": runs,
        "raw_ceiling": ceiling,
        "retrieval_raw_ceiling": retrieval_ceiling,
        "fusion_raw_ceiling": fusion_ceiling,
        **stats,
    }
    if do_downstream and "jepa" in args.arms:
        rec = [r["jepa"]["downstream"]["retrieval"] for r in runs]
        results["retrieval_over_chance"] = {
            "predictor": [over_chance(x) for x in rec],
            **{
                f"{read}_{split}": [over_chance(x[read][split]) for x in rec]
                for read in ("mapped", "mapped_tokens")
                for split in ("test", "external")
            },
        }
        results["fusion_margin"] = {
            s: [fusion_margin(r["jepa"]["downstream"]["cindex"], s) for r in runs]
            for s in ("test", "external", *PAIRED, *(["internal_cv"] if args.cross_fit else []))
        }
        results["clinical_margin"] = {
            s: [clinical_margin(r["jepa"]["downstream"]["cindex"], s) for r in runs]
            for s in ("test", "external", *PAIRED, *(["internal_cv"] if args.cross_fit else []))
        }
        sup = results["supervised_ceiling"] = supervised_ceiling(held, truth)
        print(
            "supervised CNN, test R²: " + " ".join(f"{f} {v:.2f}" for f, v in sup["mean"].items()), flush=True
        )
        jepa = {f: float(np.mean([r["jepa"]["attentive"][f] for r in runs])) for f in FACTORS}
        bound = results["fusion_bound"] = fusion_bound(
            pairs,
            {
                "jepa_attentive": jepa,
                "supervised_cnn": sup["mean"],
                "jepa_with_mass_exact": jepa | {"mass": 1.0},
                "latents_exact": dict.fromkeys(FACTORS, 1.0),
            },
        )
        for name, b in bound.items():
            if name != "ehr":
                print(
                    f"fusion bound, image read at {name} R²: margin over the better of raw EHR "
                    f"({bound['ehr']['test']:.3f} / {bound['ehr']['external']:.3f}) and the image alone"
                    f" ({b['image']['test']:.3f} / {b['image']['external']:.3f}):"
                    f" test {b['margin']['test']:+.3f}  external {b['margin']['external']:+.3f}",
                    flush=True,
                )
        for read, v in results["retrieval_over_chance"].items():
            print(f"JEPA recall@{RETRIEVAL_K} / chance per seed ({read}): " + " ".join(f"{x:.2f}" for x in v))
        for s, v in results["fusion_margin"].items():
            print(
                f"JEPA best fusion - best unimodal c-index ({s}) per seed: "
                + " ".join(f"{x:+.3f}" for x in v)
            )
        for s, v in results["clinical_margin"].items():
            print(
                f"JEPA image head with the raw-EHR Cox model - that model alone ({s}) per seed: "
                + " ".join(f"{x:+.3f}" for x in v)
            )
    others = [a for a in args.downstream_arms if a != "jepa" and a in args.arms]
    if do_downstream and "jepa" in args.downstream_arms and "jepa" in args.arms and others:
        results["cindex_over_seeds"] = cindex_over_seeds(seed_risks, others)
        for name, by_strategy in results["cindex_over_seeds"].items():
            for strategy in ("image", "late_fusion", "image_with_raw_ehr"):
                cells = by_strategy.get(strategy, {})
                print(
                    f"mean over seeds {name} c-index {strategy}: "
                    + "  ".join(
                        f"{split} {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                        for split, d in cells.items()
                        if d["ci95"]
                    )
                )
    if do_downstream and args.cross_fit and seed_cf[0]:
        results["cross_fit_over_seeds"] = cross_fit_over_seeds(seed_cf)
        for name, d in differences(results["cross_fit_over_seeds"]):
            if d["ci95"]:
                print(
                    f"mean over seeds, cross-fitted internal ({args.cross_fit} folds) {name}: "
                    f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                )
    if set(args.arms) == set(ARMS):
        grid = cells_won(runs, "grid")
        results["grid_ratio"] = float(np.mean(grid))
        print(f"JEPA grid R² > random init and > MAE: {sum(grid)} of {len(grid)} (seed, factor) cells")
    if "jepa" in args.arms:  # the goal: the attentive read-out at the raw-pixel ridge
        gap = {
            f: float(np.mean([r["jepa"]["attentive"][f] for r in runs]) - ceiling["grid"][f]) for f in FACTORS
        }
        results["attentive_minus_pixel_ridge"] = gap
        print(
            "JEPA attentive R² minus the ridge on every pixel: "
            + " ".join(f"{f} {v:+.3f}" for f, v in gap.items())
        )
    print(f"JEPA attentive R² > random init and > MAE: {ratio:.2f} of (seed, factor) cells (target {TARGET})")
    report = {
        "name": "learning",
        "hardware": hardware(),
        "config": {
            "subjects": subjects,
            "images_train": len(keys),
            "steps": steps,
            "seeds": seeds,
            "first_seed": args.first_seed,
            "probe_seeds": args.probe_seeds,
            "attentive_per_factor": args.attentive_per_factor,
            "arms": args.arms,
            "ema": list(args.ema or ModelConfig().ema),
            "model": "tiny",
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "overrides": args.overrides,
            "synth": args.synth,
            "batch": 32,
            "lr": lr,
            "mae_lr": args.mae_lr or lr,
            "downstream": do_downstream,
            "head_seeds": head_seeds,
            "survival_stopping": args.survival_stopping,
            "cross_fit": args.cross_fit,
            "setup_s": setup_s,
        },
        "results": results,
        "ratio": ratio,
        "target": TARGET,
        "meets_target": bool(ratio >= TARGET),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
