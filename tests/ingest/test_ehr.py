"""EHR reading: strict-before-index windows, vocabulary from training subjects, static features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jepa_ray.ingest import ehr, identifiers
from jepa_ray.ingest import vocab as vocab_mod


def _write_meds(tmp_path):
    d = tmp_path / "meds" / "data"
    d.mkdir(parents=True)
    t = pd.to_datetime
    table = pa.table(
        {
            "subject_id": pa.array([1, 1, 1, 1, 2, 2], pa.int64()),
            "time": pa.array(
                [None, t("2020-01-01"), t("2020-01-10"), t("2020-01-20"), t("2020-01-05"), t("2020-02-01")],
                pa.timestamp("us"),
            ),
            "code": ["GENDER//F", "LAB//A", "LAB//B", "LAB//A", "LAB//C", "LAB//A"],
            "numeric_value": pa.array([None, 1.0, 2.0, 3.0, None, 5.0], pa.float32()),
        }
    )
    pq.write_table(table, d / "0.parquet")
    return tmp_path / "meds"


def test_window_is_strictly_before_the_index_and_keeps_the_last_k(tmp_path):
    tables = ehr.read_meds(_write_meds(tmp_path))
    vocab = vocab_mod.fit_vocab(tables, {"1", "2"})
    idx = int(np.datetime64("2020-01-20T00:00:00", "us").astype(np.int64))
    out = vocab_mod.subject_ehr(tables, vocab, "1", idx, max_events=10)
    # the event exactly at the index time is excluded
    assert [vocab.codes[i] for i in out["event_code"]] == ["LAB//A", "LAB//B"]
    np.testing.assert_allclose(out["event_time"], [-19.0, -10.0])
    np.testing.assert_allclose(out["event_value"], [1.0, 2.0])
    assert [vocab.codes[i] for i in out["static_code"]] == ["GENDER//F"]
    last1 = vocab_mod.subject_ehr(tables, vocab, "1", idx, max_events=1)
    assert [vocab.codes[i] for i in last1["event_code"]] == ["LAB//B"]
    early = int(np.datetime64("2019-01-01", "us").astype(np.int64))
    assert vocab_mod.subject_ehr(tables, vocab, "2", early, 10) is None  # nothing precedes the index


def test_vocab_and_stats_come_from_training_subjects_only(tmp_path):
    tables = ehr.read_meds(_write_meds(tmp_path))
    vocab = vocab_mod.fit_vocab(tables, {"1"})
    assert "LAB//C" not in vocab.codes and vocab.code_id("LAB//C") == ehr.UNK_ID
    assert vocab.codes[2] == "LAB//A"  # most frequent first
    assert vocab.code_stats["LAB//A"]["mean"] == 2.0  # subject 2's value 5.0 is not counted
    assert vocab.code_stats["LAB//A"]["count"] == 2
    assert vocab.code_stats["LAB//A"]["std"] == 1.0  # of [1, 3]
    assert "GENDER//F" not in vocab.code_stats  # a code without values has a count but no statistics


def test_subject_ids_from_a_float_column_and_padded_strings(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    t = pd.Timestamp("2020-01-01")
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([1.0, 2.5, float("nan"), 3.0]),
                "time": pa.array([t, t, t, t], pa.timestamp("us")),
                "code": [" LAB//A ", "LAB//A", "LAB//A", "   "],
            }
        ),
        d / "0.parquet",
    )
    tables = ehr.read_meds(tmp_path)
    assert set(tables.events) == {"1"}  # 1.0 joins a DICOM PatientID "1"
    assert tables.code_names == ["LAB//A"]  # codes are trimmed
    reasons = {q.reason: q.rows for q in tables.quarantine}
    assert reasons == {"missing_subject": [1, 2], "missing_code": [3]}


def test_static_table_types_and_missingness(tmp_path):
    tables = ehr.read_meds(_write_meds(tmp_path))
    static = pd.DataFrame(
        {
            "subject_id": [1, 2],
            "age": [60.0, None],
            "sex": ["F", None],
            "visit": pd.to_datetime(["2020-01-01", "2020-01-02"]),
        }
    )
    static.to_parquet(tmp_path / "static.parquet")
    ehr.read_static(tmp_path / "static.parquet", tables)
    assert tables.static_numeric == ["age"] and tables.static_categorical == ["sex"]
    assert tables.ignored_columns["static"] == ["visit"]
    vocab = vocab_mod.fit_vocab(tables, {"1", "2"})
    idx = int(np.datetime64("2021-01-01", "us").astype(np.int64))
    a, b = (vocab_mod.subject_ehr(tables, vocab, k, idx, 8) for k in ("1", "2"))
    assert a["static_num"][0] == 60.0 and np.isnan(b["static_num"][0])
    assert a["static_cat"][0] == 2 and b["static_cat"][0] == ehr.PAD_ID


def test_outcome_conventions(tmp_path):
    tables = ehr.read_meds(_write_meds(tmp_path))
    oc = pd.DataFrame(
        {
            "subject_id": [1, 2],
            "index_time": pd.to_datetime(["2020-01-15", None]),
            "sick": [True, False],
            "death_time": pd.to_datetime(["2021-01-01", None]),
            "death_event": [True, True],
            "note": ["x", "y"],
        }
    )
    oc.to_parquet(tmp_path / "outcomes.parquet")
    ehr.read_outcomes(tmp_path / "outcomes.parquet", tables)
    assert tables.label_names == ["sick"] and tables.tte_names == ["death"]
    assert tables.ignored_columns["outcomes"] == ["note"]
    assert tables.outcomes["1"].labels == {"sick": True}
    assert tables.outcomes["2"].tte["death"] == (None, True)
    q = [x for x in tables.quarantine if x.reason == "missing_event_time"]
    assert q and q[0].rows == [1]


# --- de-identification of the EHR ----------------------------------------------------------------


def test_identifier_and_free_text_columns_are_recognised():
    n = 40
    rng = np.random.default_rng(0)
    columns = {
        "mrn": pd.Series(rng.integers(0, 50, n)),  # by name, whatever the values
        "Patient_Name": pd.Series(["A"] * n),
        "comment": pd.Series(["ok"] * n),
        "record": pd.Series(rng.permutation(10**6)[:n]),  # distinct integers: a record number
        "initials": pd.Series([f"X{i:03d}" for i in range(n)]),  # mostly distinct text
        "history": pd.Series(["smoker, stopped in 2015 after a heart attack"] * n),  # several words
    }
    for name, s in columns.items():
        assert identifiers.identifier_column(name, s) is not None, name
    usual = {
        "age": pd.Series(rng.integers(30, 90, n).astype(float)),
        "sex": pd.Series(rng.choice(["F", "M"], n)),
        "tgrade": pd.Series(rng.choice(["I", "II", "III"], n)),
        "pnodes": pd.Series(rng.integers(0, 30, n)),
        "row_number": pd.Series(np.arange(n)),  # 0..n-1 is a count, not a record number
        "smoker": pd.Series(rng.random(n) < 0.3),
        "stage": pd.Series(rng.choice(["stage II", "stage III"], n)),  # one space is a category
    }
    for name, s in usual.items():
        assert identifiers.identifier_column(name, s) is None, name


def test_only_values_and_codes_shared_by_k_training_subjects_are_kept(tmp_path):
    tables = ehr.read_meds(_write_meds(tmp_path))  # LAB//A: both subjects; LAB//B, GENDER//F: one
    vocab = vocab_mod.fit_vocab(tables, {"1", "2"}, min_subjects=2)
    assert vocab.codes == ["<pad>", "<unk>", "LAB//A"]
    assert vocab.code_id("LAB//B") == ehr.UNK_ID and "LAB//B" not in vocab.code_stats
    static = pd.DataFrame(
        {
            "subject_id": [1, 2, 3],
            "sex": ["F", "F", "M"],  # M: one subject only
            "ward": ["W1", "W2", "W3"],  # no value shared: the column goes
        }
    )
    static.to_parquet(tmp_path / "static.parquet")
    ehr.read_static(tmp_path / "static.parquet", tables)
    vocab = vocab_mod.fit_vocab(tables, {"1", "2", "3"}, min_subjects=2)
    assert [f["name"] for f in vocab.static_categorical] == ["sex"]
    assert vocab.static_categorical[0]["values"] == ["F"] and vocab.static_categorical[0]["rare_values"] == 1
    assert tables.dropped_columns == [
        {
            "table": "static",
            "column": "ward",
            "reason": "rare_values: no value is shared by 2 training subjects",
        }
    ]
    idx = int(np.datetime64("2021-01-01", "us").astype(np.int64))
    m = vocab_mod.subject_ehr(tables, vocab, "3", idx, 8)
    assert m["static_cat"].tolist() == [ehr.UNK_ID]  # the rare value is written as <unk>


def test_declared_static_columns_are_the_only_ones_ingested(tmp_path):
    import pytest

    from jepa_ray.errors import InvalidEhrError

    static = pd.DataFrame(
        {
            "subject_id": [1, 2, 3],
            "stage": [1, 2, 3],  # numbers that are categories
            "bmi": [24.0, 31.5, None],
            "ward": ["W1", "W1", "W2"],  # not declared: dropped, though it looks harmless
            "patient_name": ["A B", "C D", "E F"],  # declared, but an identifier: dropped anyway
        }
    )
    path = tmp_path / "static.parquet"
    static.to_parquet(path)
    tables = ehr.read_static(path, ehr.EhrTables(), numeric=["bmi"], categorical=["stage", "patient_name"])
    assert tables.static_numeric == ["bmi"] and tables.static_categorical == ["stage"]
    reasons = {d["column"]: d["reason"].split(":")[0] for d in tables.dropped_columns}
    assert reasons == {"ward": "undeclared", "patient_name": "identifier_name"}
    assert tables.static["2"]["stage"] == "2"  # a declared category keeps its numbers as values
    for numeric, categorical, says in (
        (["bmi", "smoker"], [], "['smoker'] declared but not in the table"),
        (["ward"], [], "['ward'] declared numeric but hold"),
        (["bmi"], ["bmi"], "['bmi'] declared both numeric and categorical"),
    ):
        with pytest.raises(InvalidEhrError) as info:
            ehr.read_static(path, ehr.EhrTables(), numeric=numeric, categorical=categorical)
        assert says in str(info.value) and str(path) in str(info.value)


def test_free_text_codes_never_enter_the_vocabulary(tmp_path):
    note = "NOTE//Pt seen in clinic today, complains of chest pain radiating to the left arm since Monday"
    codes = {
        "LOINC//2345-7": True,
        "SNOMED//44054006": True,
        "RXNORM//1049630": True,
        "LAB//Glucose [Mass/volume] in Serum or Plasma --2 hours post 75 g glucose PO": True,
        "ICD10CM//E11.9": True,
        note: False,  # free text, shared by every subject
        "CONTACT//jane.doe@example.org": False,
        "CALLBACK//(555) 123-4567": False,
        "NOTE//seen 2019-05-01": False,
        "NOTE//seen 5/1/2019": False,
        "ID//123-45-6789": False,
        "X" * 161: False,
    }
    rows = [(s, f"2020-01-0{d + 1}", c) for s in range(1, 4) for d, c in enumerate(codes)]
    frame = pd.DataFrame(rows, columns=["subject_id", "time", "code"])
    frame["time"] = pd.to_datetime(frame["time"].str.slice(0, 10), errors="coerce").fillna(
        pd.Timestamp("2020-01-01")
    )
    frame["numeric_value"] = np.float32(np.nan)
    (tmp_path / "data").mkdir()
    frame.to_parquet(tmp_path / "data" / "0.parquet")
    tables = ehr.read_meds(tmp_path)
    vocab = vocab_mod.fit_vocab(tables, {"1", "2", "3"}, min_subjects=3)
    assert sorted(vocab.codes[2:]) == sorted(c for c, keep in codes.items() if keep)
    assert tables.dropped_codes == {"free_text": 2, "personal_pattern": 5}
    assert vocab.code_id(note) == ehr.UNK_ID


def test_event_times_are_rounded_and_ages_capped(tmp_path):
    d = tmp_path / "meds" / "data"
    d.mkdir(parents=True)
    t = pd.to_datetime
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([1, 1, 1], pa.int64()),
                "time": pa.array([t("1925-03-07 13:00"), t("2019-12-21 07:30"), t("2020-01-01 09:00")]),
                "code": ["MEDS_BIRTH", "LAB//A", "LAB//A"],
                "numeric_value": pa.array([None, 1.0, 2.0], pa.float32()),
            }
        ),
        d / "0.parquet",
    )
    tables = ehr.read_meds(tmp_path / "meds")
    pd.DataFrame({"subject_id": [1], "age": [94.6], "age_at_diagnosis": [70.2]}).to_parquet(
        tmp_path / "s.parquet"
    )
    ehr.read_static(tmp_path / "s.parquet", tables)
    vocab = vocab_mod.fit_vocab(tables, {"1"})
    idx = int(np.datetime64("2020-01-01T12:00:00", "us").astype(np.int64))
    raw = vocab_mod.subject_ehr(tables, vocab, "1", idx, 8)
    assert raw["event_time"][0] < -94 * 365 and raw["event_time"][2] == np.float32(-0.125)  # exact
    out = vocab_mod.subject_ehr(tables, vocab, "1", idx, 8, time_resolution_days=1.0, max_age_years=90)
    assert out["event_time"][0] == np.float32(-90 * 365.25)  # 94.8 years old: written as 90
    assert out["event_time"][1:].tolist() == [-12.0, -1.0]  # whole days, rounded down: still before
    assert out["static_num"].tolist() == [90.0, np.float32(70.2)]
    young = vocab_mod.subject_ehr(
        tables,
        vocab,
        "1",
        int(np.datetime64("1970-01-01", "us").astype(np.int64)),
        8,
        time_resolution_days=1.0,
        max_age_years=90,
    )
    assert young["event_time"][0] == np.float32(-45 * 365.25)  # the birth in whole years (44.8 -> 45)
