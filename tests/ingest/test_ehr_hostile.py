"""Careless and hostile EHR exports: time zones and epoch numbers in `time`, text in `numeric_value`,
bytes that are not UTF-8 in `code`, identifiers shaped as codes, and static columns that hold
places, dates and contacts. Nothing crashes, a bad file or row is quarantined with its reason,
everything else is kept, and no identifier reaches the vocabulary, the shards, a log or the console.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from jepa_ray.ingest import ehr
from jepa_ray.ingest import vocab as vocab_mod
from jepa_ray.ingest.identifiers import age_column, free_text_code

LEAK = "ZQHOSTILE"  # in every planted identifier, so that one search finds them all


def _us(text: str) -> int:
    return int(np.datetime64(text, "us").astype(np.int64))


def _meds(root: Path, **files: pa.Table) -> Path:
    data = root / "meds" / "data"
    data.mkdir(parents=True)
    for name, table in files.items():
        pq.write_table(table, data / f"{name}.parquet")
    return root / "meds"


def _events(subject, time, code, value=None) -> pa.Table:
    n = len(code)
    columns = {"subject_id": pa.array([subject] * n, pa.int64()), "time": time, "code": code}
    if value is not None:
        columns["numeric_value"] = value
    return pa.table(columns)


def _reasons(tables: ehr.EhrTables) -> dict[str, tuple[str, str, list[int] | None]]:
    return {q.reason: (q.input, q.kind, q.rows) for q in tables.quarantine}


def _good(subject: int = 1) -> pa.Table:
    return _events(subject, pa.array([_us("2016-01-01")], pa.timestamp("us")), ["LAB//A"], pa.array([1.0]))


# --- times ----------------------------------------------------------------------------------------


def test_times_with_offsets_are_converted_to_utc_and_naive_ones_read_as_utc(tmp_path):
    times = [
        "2016-03-12T09:00:00-05:00",  # EST ...
        "2016-03-14T09:00:00-04:00",  # ... and EDT: one file across a daylight-saving change
        "2016-03-15T09:00:00Z",
        "2016-03-16 09:00:00",  # naive, beside offset-aware ones
        "16 March 2016 09:00",  # not ISO 8601
        "not a date",
    ]
    meds = _meds(tmp_path, a=_events(1, times, ["LAB//X"] * 6))
    tables = ehr.read_meds(meds)
    assert _reasons(tables) == {"unparsable_time": ("data/a.parquet", "ehr_rows", [5])}
    expected = [
        "2016-03-12T14:00",
        "2016-03-14T13:00",
        "2016-03-15T09:00",
        "2016-03-16T09:00",
        "2016-03-16T09:00",
    ]
    assert tables.events["1"].times.tolist() == [_us(t) for t in expected]


def test_outcome_index_times_with_mixed_offsets_are_read_in_utc(tmp_path):
    oc = pd.DataFrame(
        {
            "subject_id": [1, 2, 3, 4],
            "index_time": [
                "2016-03-12T09:00:00-05:00",
                "2016-03-14T09:00:00-04:00",
                "2016-03-14T09:00:00",
                None,
            ],
            "death": [0, 1, 0, 1],
        }
    )
    oc.to_parquet(tmp_path / "outcomes.parquet")
    tables = ehr.read_outcomes(tmp_path / "outcomes.parquet", ehr.EhrTables())
    assert tables.quarantine == []
    got = {k: o.index_time for k, o in tables.outcomes.items()}
    assert got == {
        "1": _us("2016-03-12T14:00"),
        "2": _us("2016-03-14T13:00"),
        "3": _us("2016-03-14T09:00"),
        "4": None,
    }


def test_integer_epoch_times_are_read_in_the_unit_their_magnitude_gives(tmp_path):
    seconds = 1_458_000_000  # 2016-03-15T00:00:00Z
    files = {
        f"{unit}": _events(i + 1, pa.array([seconds * scale, None], pa.int64()), ["LAB//E", "GENDER//F"])
        for i, (unit, scale) in enumerate({"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}.items())
    }
    files["before_1970"] = _events(5, pa.array([-seconds], pa.int64()), ["LAB//E"])
    files["small"] = _events(6, pa.array([5, 17], pa.int64()), ["LAB//E", "LAB//E"])  # no unit can be told
    tables = ehr.read_meds(_meds(tmp_path, **files))
    for subject in "1234":
        assert tables.events[subject].times.tolist() == [_us("2016-03-15T00:00")], subject
        assert len(tables.events[subject].static_codes) == 1  # a null time is still a static event
    assert tables.events["5"].times.tolist() == [-seconds * 10**6]  # 1923: before 1970 is negative
    assert "6" not in tables.events
    assert _reasons(tables) == {"ambiguous_time_unit": ("data/small.parquet", "ehr_file", None)}
    assert tables.event_files == 5 and tables.event_rows == 9  # the quarantined file is not counted


def test_a_column_of_an_unusable_type_quarantines_its_file_and_nothing_else(tmp_path):
    t = pa.array([_us("2016-01-01")], pa.timestamp("us"))
    files = {
        "good": _good(1),
        "bool_time": _events(2, pa.array([True]), ["LAB//A"]),
        "list_value": _events(3, t, ["LAB//A"], pa.array([[1.0, 2.0]])),
        "struct_code": _events(4, t, pa.array([{"a": 1}])),
    }
    tables = ehr.read_meds(_meds(tmp_path, **files))
    assert set(tables.events) == {"1"}
    bad = sorted((q.input, q.reason) for q in tables.quarantine)
    assert bad == [
        ("data/bool_time.parquet", "unsupported_column_type"),
        ("data/list_value.parquet", "unsupported_column_type"),
        ("data/struct_code.parquet", "unsupported_column_type"),
    ]


# --- values and codes ------------------------------------------------------------------------------


def test_text_values_are_read_leniently_and_never_quoted(tmp_path, caplog):
    note = f"see note - {LEAK} Smith 555-0100"
    values = ["3.5", "<5", ">100", " 1e3 ", "", None, note, "nan", "-2"]
    n = len(values)
    times = pa.array([_us("2016-01-01") + i * ehr.US_PER_DAY for i in range(n)], pa.timestamp("us"))
    with caplog.at_level(logging.DEBUG):
        tables = ehr.read_meds(_meds(tmp_path, a=_events(1, times, ["LAB//CRP"] * n, values)))
    got = tables.events["1"].values
    assert len(got) == n  # every event kept
    np.testing.assert_array_equal(
        got, np.array([3.5, np.nan, np.nan, 1000, np.nan, np.nan, np.nan, np.nan, -2], np.float32)
    )
    assert _reasons(tables) == {"non_numeric_value": ("data/a.parquet", "ehr_values", [1, 2, 6, 7])}
    said = json.dumps([q.to_json() for q in tables.quarantine]) + caplog.text
    assert LEAK not in said and "555-0100" not in said


def test_a_code_that_is_not_utf8_quarantines_its_rows_only(tmp_path):
    t = pa.array([_us("2016-01-01")] * 2, pa.timestamp("us"))
    binary = pa.array([f"DX//M\xfcller {LEAK}".encode("latin-1"), b"LAB//A"], pa.binary())
    # a string column whose bytes are not UTF-8: parquet stores it without checking
    raw = f"DX//M\xfcller {LEAK}".encode("latin-1")
    offsets = pa.py_buffer(np.array([0, len(raw), len(raw) + 6], np.int32).tobytes())
    text = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(raw + b"LAB//B")])
    tables = ehr.read_meds(_meds(tmp_path, a=_events(1, t, binary), b=_events(2, t, text)))
    assert tables.code_names == ["LAB//A", "LAB//B"]
    assert [(q.input, q.reason, q.rows) for q in tables.quarantine] == [
        ("data/a.parquet", "invalid_utf8_code", [0]),
        ("data/b.parquet", "invalid_utf8_code", [0]),
    ]
    assert LEAK not in json.dumps([q.to_json() for q in tables.quarantine])


IDENTIFIER_CODES = [
    # dates in the formats hospitals export
    "ADMIT//15.04.2013",
    "ADMIT//20130415",
    "ADMIT//15042013",
    "APPT//April 15 2013",
    "APPT//Apr 15, 2013",
    "APPT//15 April 2013",
    "APPT//15-Apr-13",
    "APPT//April 2013",
    "VISIT//2013/04/15",
    "VISIT//2013-04-15T09:30",
    "VISIT//04-15-2013",
    "NOTE//seen 5/1/2019",
    # phone numbers
    "CONTACT//+44 20 7946 0958",
    "CALL//+1 (555) 123-4567",
    "CALL//+33 6 12 34 56 78",
    "CALL//020 7946 0958",
    "CALL//(555)123-4567",
    "CALL//555.123.4567",
    "CONTACT//555.0100",
    "CALL//555-0100",
    # social security and record numbers, e-mail and web addresses
    "SSN//123456789",
    "ID//123-45-6789",
    "ID//123 45 6789",
    "X//987654321",
    "X//ref 0012345678901",
    "MRN//ZZLEAKMRN0042",
    "FLAG//mrn 004211",
    "CONTACT//jane.doe@example.org",
    "LINK//https://portal.example.org/p/1",
    # vocabularies that name an identifier or free text, whatever follows
    "PHONE//call back",
    "EMAIL//on file",
    "DOB//known",
    "ZIP//02139",
    "NAME//Smith",
    "NOTE//Dr Quillfeather",
]

MEDICAL_CODES = [
    "ICD10CM//E11.9",
    "ICD10CM//S72.001A",
    "ICD10CM//Z99.11",
    "ICD//10//I10",
    "ICD9CM//250.00",
    "ICD10PCS//0DTJ4ZZ",
    "LOINC//2345-7",
    "LOINC//94500-6",
    "LOINC//LP31755-9",
    "SNOMED//44054006",
    "SNOMED//195967001",
    "SNOMED//20151003",  # shaped like a compact date: kept, its vocabulary is numeric
    "SNOMED//900000000000207008",
    "SNOMEDCT//1000000091000119105",
    "RXNORM//1049630",
    "RxNorm//197361",
    "NDC//00409490234",
    "NDC//00409-4902-34",
    "OMOP//2000000001",
    "CPT4//99213",
    "HCPCS//J1100",
    "CVX//208",
    "ATC//C10AA05",
    "ATC//N02BE01",
    "UMLS//C0011849",
    "MEDS_BIRTH",
    "MEDS_DEATH",
    "GENDER//F",
    "LAB//50931//mg/dL",
    "LAB//220045//bpm",
    "LAB//eGFR//mL/min/1.73m2",
    "LAB//HbA1c 6.5%",
    "VITAL//SBP//mm[Hg]",
    "LAB//Glucose [Mass/volume] in Serum or Plasma --2 hours post 75 g glucose PO",
    "MEDICATION//Amoxicillin 250 mg/5 mL",
    "MEDICATION//START//Acetaminophen 325mg Tablet",
    "DIAGNOSIS//ICD//9//25000",
    "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM",
    "ENCOUNTER//TELEPHONE",
    "VACCINE//mRNA-1273",
    "LAB//2019-nCoV RNA",
    "PROC//OCT 3D",
    "DX//MS Relapse",
]


def test_identifier_shaped_codes_are_dropped():
    kept = [c for c in IDENTIFIER_CODES if free_text_code(c) is None]
    assert kept == []


def test_real_medical_codes_are_kept():
    dropped = {c: free_text_code(c) for c in MEDICAL_CODES if free_text_code(c) is not None}
    assert dropped == {}


def test_identifier_codes_shared_by_every_subject_never_reach_the_vocabulary(tmp_path):
    codes = IDENTIFIER_CODES + MEDICAL_CODES
    t = pa.array([_us("2016-01-01")] * len(codes), pa.timestamp("us"))
    tables = ehr.read_meds(_meds(tmp_path, **{f"s{s}": _events(s, t, codes) for s in (1, 2, 3)}))
    vocab = vocab_mod.fit_vocab(tables, {"1", "2", "3"}, min_subjects=2)
    assert sorted(vocab.codes[2:]) == sorted(MEDICAL_CODES)
    assert sum(tables.dropped_codes.values()) == len(IDENTIFIER_CODES)
    assert set(tables.dropped_codes) == {"personal_pattern", "identifier_vocabulary"}


# --- the static table ------------------------------------------------------------------------------

STATIC_CSV = """subject_id,age,AgeAtIndex,patient_age,age_years,dosage,stage,sex,admission_date,zipcode,county,pcp_contact,admit_yyyymmdd,seen,ref,helper,ward
1,71.0,95,93,91.5,120,2,M,2013-04-17,02141,Middlesex,555-123-4567,20130415,2013-04-15,20130415,drjones@clinic.example,W1
2,68.5,80,97,60,80,3,F,2013-04-16,02139,Suffolk,drjones@clinic.example,20130416,2013-04-16,20130416,555-123-4567,W1
3,44.9,89,88,89,100,2,F,2013-04-16,02139,Suffolk,555-123-4567,20130417,2013-04-15,20130417,drjones@clinic.example,W2
"""


def test_static_places_dates_and_contacts_are_dropped_and_ages_capped(tmp_path):
    path = tmp_path / "static.csv"
    path.write_text(STATIC_CSV)
    tables = ehr.read_static(path, ehr.EhrTables())
    reasons = {d["column"]: d["reason"].split(":")[0] for d in tables.dropped_columns}
    assert reasons == {
        "admission_date": "identifier_name",
        "zipcode": "identifier_name",  # read by the CSV reader as the number 2141
        "county": "identifier_name",
        "pcp_contact": "identifier_name",
        "admit_yyyymmdd": "identifier_name",
        "seen": "personal_values",  # a harmless name, dates inside
        "ref": "date_values",  # whole numbers that are yyyymmdd dates
        "helper": "personal_values",  # e-mail addresses and phone numbers
    }
    assert LEAK not in json.dumps(tables.dropped_columns) and "drjones" not in json.dumps(
        tables.dropped_columns
    )
    assert tables.static_numeric == ["age", "AgeAtIndex", "patient_age", "age_years", "dosage", "stage"]
    assert tables.static_categorical == ["sex", "ward"]
    vocab = vocab_mod.fit_vocab(tables, {"1", "2", "3"})
    idx = _us("2020-01-01")
    rows = [
        vocab_mod.subject_ehr(tables, vocab, k, idx, 8, max_age_years=90)["static_num"].tolist()
        for k in "123"
    ]
    # every age column capped at 90; dosage and stage are not ages
    assert rows == [
        [71.0, 90.0, 90.0, 90.0, 120.0, 2.0],
        [68.5, 80.0, 90.0, 60.0, 80.0, 3.0],
        [np.float32(44.9), 89.0, 88.0, 89.0, 100.0, 2.0],
    ]


def test_age_columns_are_recognised_by_the_word_age():
    assert all(
        age_column(n) for n in ["age", "Age", "AgeAtIndex", "patient_age", "age_years", "PatientAge", "ages"]
    )
    assert not any(age_column(n) for n in ["dosage", "stage", "agent", "page_count", "lineage"])


# --- through prepare: the manifest, the shards, the log and the console ---------------------------


def test_hostile_ehr_through_prepare_leaves_no_identifier_anywhere(ray_session, tmp_path, caplog):
    from jepa_ray.cli import app

    subjects = list(range(101, 113))
    t0 = _us("2016-01-01")
    base = pa.table(
        {
            "subject_id": pa.array(np.repeat(subjects, 3), pa.int64()),
            "time": pa.array([t0 + i * ehr.US_PER_DAY for i in range(3)] * len(subjects), pa.timestamp("us")),
            "code": ["LAB//CRP", "ICD10CM//E11.9", "SNOMED//44054006"] * len(subjects),
            "numeric_value": pa.array([1.0, None, None] * len(subjects), pa.float32()),
        }
    )
    planted = [
        f"ADMIT//15.04.2013 {LEAK}",
        "APPT//April 15 2013",
        "CONTACT//+44 20 7946 0958",
        "SSN//123456789",
        f"MRN//{LEAK}MRN0042",
    ]
    shared = pa.table(
        {
            "subject_id": pa.array(np.repeat(subjects, len(planted)), pa.int64()),
            "time": pa.array(
                [f"2016-03-1{i % 3}T09:00:00-0{4 + i % 2}:00" for i in range(len(subjects) * len(planted))]
            ),
            "code": planted * len(subjects),
            "numeric_value": ["3.5", "<5", f"see note - {LEAK} 555-0100", "", ">100"] * len(subjects),
        }
    )
    hostile = pa.table(
        {
            "subject_id": pa.array([101, 102], pa.int64()),
            "time": pa.array([t0, t0], pa.timestamp("us")),
            "code": pa.array([f"DX//M\xfcller {LEAK}".encode("latin-1"), b"LAB//CRP"], pa.binary()),
        }
    )
    meds = _meds(
        tmp_path,
        base=base,
        shared=shared,
        hostile=hostile,
        epoch=_events(103, pa.array([7, 9], pa.int64()), ["LAB//CRP"] * 2),
    )
    static = pd.DataFrame(
        {
            "subject_id": subjects,
            "AgeAtIndex": [95.0, 93.0] * 6,
            "sex": ["F", "M"] * 6,
            "zipcode": ["02139"] * 12,
            "county": [f"{LEAK}COUNTY"] * 12,
            "pcp_contact": [f"{LEAK.lower()}@clinic.example", "555-123-4567"] * 6,
            "admission_date": ["2013-04-15"] * 12,
        }
    )
    static.to_csv(tmp_path / "static.csv", index=False)
    pd.DataFrame(
        {"subject_id": subjects, "index_time": ["2016-03-12T09:00:00-05:00", "2016-03-14T09:00:00-04:00"] * 6}
    ).to_parquet(tmp_path / "outcomes.parquet")

    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        r = CliRunner().invoke(
            app,
            [
                "prepare",
                "--meds", str(meds),
                "--static", str(tmp_path / "static.csv"),
                "--outcomes", str(tmp_path / "outcomes.parquet"),
                "--out", str(out),
                "prepare.ehr.min_subjects=2",
            ],
        )  # fmt: skip
    assert r.exit_code == 0, r.output[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["ehr"]["codes"][2:]) == {"LAB//CRP", "ICD10CM//E11.9", "SNOMED//44054006"}
    assert manifest["ehr"]["dropped_codes"] == {"personal_pattern": 5}
    assert [f["name"] for f in manifest["ehr"]["static_numeric"]] == ["AgeAtIndex"]
    assert [f["name"] for f in manifest["ehr"]["static_categorical"]] == ["sex"]
    reasons = {q["reason"]: q["kind"] for q in manifest["quarantine"]["items"]}
    assert reasons == {
        "non_numeric_value": "ehr_values",
        "invalid_utf8_code": "ehr_rows",
        "ambiguous_time_unit": "ehr_file",
    }
    ages = []
    blobs = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m).read()
                blobs[m.name] = data
                if m.name.endswith(".ehr.npz"):
                    from jepa_ray.shards.format import decode_npz

                    ages += decode_npz(data)["static_num"].tolist()
    assert len(ages) == len(subjects) and max(ages) == 90.0  # AgeAtIndex 95 and 93, written as 90
    blobs["console"] = r.output.encode()
    blobs["driver log"] = caplog.text.encode()
    secrets = [LEAK, LEAK.lower(), "M\xfcller", "15.04.2013", "April 15 2013", "7946 0958", "123456789",
               "555-0100", "555-123-4567", "2013-04-15"]  # fmt: skip
    needles = [s.encode() for s in secrets] + ["M\xfcller".encode("latin-1")]
    leaks = sorted({f"{n!r} in {name}" for name, b in blobs.items() for n in needles if n in b})
    # Ray's worker logs too, for the planted text (their numbers could match a digit string by chance)
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    for p in logs.rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000 and LEAK.lower().encode() in p.read_bytes().lower():
            leaks.append(f"{LEAK} in Ray log {p.name}")
    assert leaks == []
