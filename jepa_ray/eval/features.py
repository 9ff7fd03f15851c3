"""Inputs of the time-to-event heads: fusion inputs from cached embeddings, and the raw EHR
feature matrix of the classical Cox baseline."""

from __future__ import annotations

from typing import Any

import numpy as np

from jepa_ray.eval.samples import Split
from jepa_ray.eval.survival import FusionInputs
from jepa_ray.stream.transform import FeatureSpec

TOP_CODES = 32  # most frequent codes (in the fit split) the raw baseline counts


def fusion_inputs(s: Split, endpoint: str) -> FusionInputs:
    """One split's embeddings and follow-up as the survival heads take them."""
    c = s.cols
    n, d = c["emb_image"].shape
    keep = c["ehr_keep"].astype(bool)
    time, event = s.tte(endpoint)
    return FusionInputs(
        img_tokens=c["img_tokens"].astype(np.float32).reshape(n, -1, d),
        ehr_tokens=c["ehr_tokens"].astype(np.float32).reshape(n, keep.shape[1], d),
        ehr_keep=keep,
        has_image=c["has_image"].astype(bool),
        has_ehr=c["has_ehr"].astype(bool),
        img_pooled=c["emb_image"].astype(np.float32),
        ehr_pooled=c["emb_ehr"].astype(np.float32),
        time=time,
        event=event,
    )


def raw_ehr_features(
    splits: dict[str, Split], manifest: dict[str, Any], fit_split: str
) -> dict[str, np.ndarray]:
    """Per split (n, F): static numeric values (standardised, NaN when missing), one-hot static
    categories, and for the fit split's most frequent codes the count and the mean standardised
    value in the sample's EHR window (NaN when none). NaN rows for samples without EHR."""
    spec = FeatureSpec.from_manifest(manifest)
    top, valued = frequent_codes(splits[fit_split], manifest)
    return {
        name: _features(s.cols, len(spec.num_names), spec.cat_sizes, top, valued)
        for name, s in splits.items()
    }


def frequent_codes(fit: Split, manifest: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(the TOP_CODES codes most samples of `fit` have, those of them with numeric values): the codes
    whose counts and mean values `raw_ehr_features` takes, in its column order."""
    spec = FeatureSpec.from_manifest(manifest)
    first_code = len(spec.num_names) + len(spec.cat_sizes)
    c = fit.cols
    valid = c["ehr_valid"].astype(bool)
    per_sample = [
        set(c["ehr_code"][i, first_code:][valid[i, first_code:]].tolist()) for i in range(len(valid))
    ]
    freq: dict[int, int] = {}
    for codes in per_sample:
        for code in codes:
            freq[code] = freq.get(code, 0) + 1
    top = sorted(freq, key=lambda k: (-freq[k], k))[:TOP_CODES]
    return top, [k for k in top if spec.code_std[k] != 1.0 or spec.code_mean[k] != 0.0]


def _features(c: dict[str, np.ndarray], n_num: int, cat_sizes: list[int], top: list[int], valued: list[int]):
    code, value = c["ehr_code"], c["ehr_value"].astype(float)
    present, valid = c["ehr_value_present"].astype(bool), c["ehr_valid"].astype(bool)
    n = len(code)
    parts = [np.where(present[:, :n_num], value[:, :n_num], np.nan)]
    for j, size in enumerate(cat_sizes):
        parts.append(np.eye(size)[code[:, n_num + j]])
    rest = slice(n_num + len(cat_sizes), None)
    rc, rv, rp, rok = code[:, rest], value[:, rest], present[:, rest], valid[:, rest]
    counts = np.stack([((rc == k) & rok).sum(1) for k in top], 1) if top else np.zeros((n, 0))
    means = np.full((n, len(valued)), np.nan)
    for j, k in enumerate(valued):
        hit = (rc == k) & rok & rp
        m = hit.sum(1) > 0
        means[m, j] = (rv * hit).sum(1)[m] / hit.sum(1)[m]
    x = np.concatenate([*parts, counts, means], axis=1).astype(float)
    x[~c["has_ehr"].astype(bool)] = np.nan
    return x
