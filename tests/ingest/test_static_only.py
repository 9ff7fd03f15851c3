"""A static table alone (a registry: one row per patient, as clinical tables often come) is an
EHR-only cohort; beside MEDS or DICOM its rows of unknown subjects stay orphans (test_quarantine)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jepa_ray.config import load_config
from jepa_ray.errors import PrepareError
from jepa_ray.ingest.prepare import prepare


def _registry(tmp_path):
    """WHAS500 (500 heart-attack patients, shipped with scikit-survival) written as a hospital's
    registry table in its own dtypes, with an outcome table whose last row names no patient."""
    from sksurv.datasets import load_whas500

    x, y = load_whas500()
    ids = np.arange(700_001, 700_001 + len(x))
    static = x.reset_index(drop=True)
    static.insert(0, "subject_id", ids)
    static.to_parquet(tmp_path / "static.parquet", index=False)
    index = pd.Timestamp("2016-01-01") + pd.to_timedelta(np.arange(len(x)) % 700, unit="D")
    outcomes = pd.DataFrame(
        {
            "subject_id": ids,
            "index_time": index,
            "death_time": index + pd.to_timedelta(np.maximum(y["lenfol"], 1.0), unit="D"),
            "death_event": y["fstat"],
        }
    )
    orphan = outcomes.iloc[[0]].assign(subject_id=999_999)
    pd.concat([outcomes, orphan]).to_parquet(tmp_path / "outcomes.parquet", index=False)
    return static, outcomes


def test_a_static_table_alone_is_an_ehr_only_cohort(ray_session, tmp_path):
    static, _ = _registry(tmp_path)
    cfg = load_config(overrides=["prepare.split.external_sites=[]"]).prepare
    result = prepare(
        str(tmp_path / "out"),
        cfg,
        static=str(tmp_path / "static.parquet"),
        outcomes=str(tmp_path / "outcomes.parquet"),
    )
    assert result.ok, result.problems
    m = result.manifest
    assert m["counts"]["samples"] == len(static)  # every patient, none of them imaged
    assert m["counts"].get("image", 0) == 0
    kept = {f["name"] for f in m["ehr"]["static_numeric"]} | {
        f if isinstance(f, str) else f["name"] for f in m["ehr"]["static_categorical"]
    }
    assert {"age", "bmi", "hr", "sysbp", "gender", "chf"} <= kept
    orphans = [q for q in m["quarantine"]["items"] if q["kind"] == "outcome_rows"]
    assert orphans and orphans[0]["reason"] == "unknown_subject" and orphans[0]["count"] == 1


def test_with_nothing_to_ingest_prepare_names_every_input_it_takes(tmp_path):
    with pytest.raises(PrepareError, match="--dicom, --meds and/or --static"):
        prepare(str(tmp_path / "out"), load_config().prepare, outcomes=str(tmp_path / "o.parquet"))
