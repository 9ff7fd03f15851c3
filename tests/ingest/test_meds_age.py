"""Ages recorded as MEDS events (`AGE`, `AGE_AT_ADMISSION`, `LOINC//30525-0`, ... with a numeric
value): a value over the cap (`ehr.max_age_years`) is capped as it is read, so that neither the
manifest's per-code statistics nor the shards' event values reveal it; an age in months, weeks,
days or hours is capped at the same age in its unit."""

from __future__ import annotations

import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jepa_ray.ingest import ehr
from jepa_ray.ingest import vocab as vocab_mod
from jepa_ray.ingest.identifiers import AGE_CONCEPT_CODES, age_code, age_code_units

CAP = 90.0
AGES = [104.0, 40.0, 45.0, 50.0, 55.0, 60.0, 62.0, 64.0, 66.0, 68.0, 70.0, 42.0]  # one over the cap
MONTHS = [a * 12 for a in AGES]  # 104 years is 1248 months: capped at 1080
YEAR_CODES = ["AGE", "LOINC//30525-0", "Age at visit"]

AGE_CODES = [
    "AGE",
    "age",
    "AGE_AT_ADMISSION",
    "Age at visit",
    "age_years",
    "AgeAtIndex",
    "DEMOGRAPHICS//AGE",
    "VITAL//Age//years",
    "LOINC//30525-0",
    "LOINC//21612-7",
    "LOINC/29553-5",
    "SNOMED//397669002",
    "SNOMEDCT//424144002",
]
NOT_AGE_CODES = [
    "DOSAGE",
    "STAGE",
    "LAB//PAGE",
    "MANAGE",
    "MEDICATION//DOSAGE//mg",
    "ONC//STAGE//III",
    "LAB//AGENT",
    "LINEAGE//B",
    "MEDS_BIRTH",
    "LOINC//2345-7",
    "LOINC//130525-0",  # the digits of an age concept inside another code
    "SNOMED//44054006",
    "LAB//50931//mg/dL",
]


def _us(text: str) -> int:
    return int(np.datetime64(text, "us").astype(np.int64))


def _over_cap(text: str) -> list[str]:
    """Where an over-cap age (104 years, 1248 months) shows in `text`."""
    return re.findall(r"(?<![\w.])(?:104|1248)(?:\.0+)?(?![\w.])", text)


def _meds(root: Path, codes: dict[str, list[float]], subjects: list[int]) -> Path:
    """One MEDS file: per subject, one event of each code with its value, and a LAB//CRP."""
    data = root / "meds" / "data"
    data.mkdir(parents=True)
    t0 = _us("2016-01-01")
    names = [*codes, "LAB//CRP"]
    rows = [
        (s, t0 + j * ehr.US_PER_DAY, code, codes[code][i] if code in codes else 1.0)
        for i, s in enumerate(subjects)
        for j, code in enumerate(names)
    ]
    subject, time, code, value = zip(*rows, strict=True)
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(subject, pa.int64()),
                "time": pa.array(time, pa.timestamp("us")),
                "code": list(code),
                "numeric_value": pa.array(value, pa.float64()),
            }
        ),
        data / "events.parquet",
    )
    return root / "meds"


# --- which codes are ages -------------------------------------------------------------------------


@pytest.mark.parametrize("code", AGE_CODES)
def test_an_age_code_is_recognised(code):
    assert age_code(code)
    assert age_code_units(code) == 1.0  # in years


@pytest.mark.parametrize("code", NOT_AGE_CODES)
def test_a_code_that_only_contains_the_letters_age_is_no_age(code):
    assert not age_code(code)
    assert age_code_units(code) is None


def test_the_standard_age_concepts_are_ages_under_any_vocabulary_name():
    for concept in AGE_CONCEPT_CODES:
        assert age_code(f"LOINC//{concept}") and age_code(f"SCT//{concept}//a") and age_code(concept)


@pytest.mark.parametrize(
    ("code", "per_year"),
    [
        ("AGE_MONTHS", 12.0),
        ("AgeInMonths", 12.0),
        ("AGE//mo", 12.0),
        ("Age (weeks)", 365.25 / 7),
        ("age in days at visit", 365.25),
        ("LOINC//30525-0//d", 365.25),
        ("AGE//h", 365.25 * 24),
        ("AGE//years//months", 1.0),  # years named too: the lower cap
        ("AGE//DAY_OF_ADMISSION", 1.0),  # no unit: `day` is not the part's last word nor after `in`
        ("LOINC//30525-0//a", 1.0),  # UCUM annum
    ],
)
def test_an_age_codes_unit_is_read_from_its_words(code, per_year):
    assert age_code_units(code) == pytest.approx(per_year)


# --- the statistics and the stored values ----------------------------------------------------------


def test_age_event_statistics_and_stored_values_come_from_capped_ages(tmp_path):
    codes = {c: AGES for c in YEAR_CODES} | {"AGE_MONTHS": MONTHS, "DOSAGE": AGES}
    subjects = list(range(1, len(AGES) + 1))
    tables = ehr.read_meds(_meds(tmp_path, codes, subjects), max_age_years=CAP)
    vocab = vocab_mod.fit_vocab(tables, {str(s) for s in subjects})
    capped = {c: np.minimum(AGES, CAP) for c in YEAR_CODES} | {"AGE_MONTHS": np.minimum(MONTHS, CAP * 12)}
    for code, values in capped.items():
        stats = vocab.code_stats[code]
        assert stats["count"] == len(AGES)
        assert stats["mean"] == pytest.approx(values.mean()) and stats["std"] == pytest.approx(values.std())
        assert stats["mean"] != pytest.approx(np.mean(codes[code])), code  # not the uncapped ones
    assert vocab.code_stats["DOSAGE"]["mean"] == pytest.approx(np.mean(AGES))  # not an age: as it is
    assert _over_cap(json.dumps(vocab.to_json())) == []

    idx = _us("2017-01-01")
    out = vocab_mod.subject_ehr(tables, vocab, "1", idx, 16, time_resolution_days=1.0, max_age_years=CAP)
    stored = dict(zip((vocab.codes[i] for i in out["event_code"]), out["event_value"].tolist(), strict=True))
    assert stored == {c: CAP for c in YEAR_CODES} | {"AGE_MONTHS": CAP * 12, "DOSAGE": 104.0, "LAB//CRP": 1.0}


def test_subject_ehr_caps_age_values_of_tables_read_without_a_cap(tmp_path):
    tables = ehr.read_meds(_meds(tmp_path, {"AGE": AGES, "AGE//d": [a * 365.25 for a in AGES]}, [1, 2]))
    raw = ehr.read_meds(_meds(tmp_path / "raw", {"AGE": AGES}, [1]), max_age_years=None)
    assert tables.events["1"].values.tolist()[:2] == [CAP, CAP * 365.25]  # read_meds caps by default
    assert raw.events["1"].values.tolist()[0] == 104.0  # unless told not to
    vocab = vocab_mod.fit_vocab(raw, {"1"})
    idx = _us("2017-01-01")
    assert vocab_mod.subject_ehr(raw, vocab, "1", idx, 8)["event_value"].tolist()[0] == 104.0
    out = vocab_mod.subject_ehr(raw, vocab, "1", idx, 8, max_age_years=CAP)
    assert out["event_value"].tolist() == [CAP, 1.0]


# --- through prepare: the manifest, the shards, the log and the console ---------------------------


def test_no_over_cap_age_event_reaches_the_outputs_of_prepare(ray_session, tmp_path, caplog):
    from jepa_ray.shards.format import decode_npz

    subjects = list(range(101, 101 + len(AGES)))
    codes = {c: AGES for c in YEAR_CODES} | {"AGE_MONTHS": MONTHS}
    meds = _meds(tmp_path, codes, subjects)
    out = tmp_path / "out"
    r = prepare_all_train(meds, out, caplog, min_subjects=1)
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    vocab = manifest["ehr"]
    # every subject is a training subject: the statistics are those of the capped ages, exactly
    capped = {c: np.minimum(AGES, CAP) for c in YEAR_CODES} | {"AGE_MONTHS": np.minimum(MONTHS, CAP * 12)}
    for code, values in capped.items():
        stats = vocab["code_stats"][code]
        assert stats["mean"] == pytest.approx(values.mean(), abs=1e-4)
        assert stats["std"] == pytest.approx(values.std(), abs=1e-4)
    stored: dict[str, list[float]] = {c: [] for c in capped}
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in (m for m in tf.getmembers() if m.name.endswith(".ehr.npz")):
                arrays = decode_npz(tf.extractfile(m).read())
                for i, v in zip(arrays["event_code"].tolist(), arrays["event_value"].tolist(), strict=True):
                    code = vocab["codes"][i]
                    if code in stored:
                        stored[code].append(v)
    for code, values in capped.items():
        assert sorted(stored[code]) == pytest.approx(sorted(values.tolist())), code
    assert max(max(v) for c, v in stored.items() if c != "AGE_MONTHS") == CAP
    assert max(stored["AGE_MONTHS"]) == CAP * 12
    # the log's messages, not its formatted lines: a record stamped at milliseconds 104 is no age
    written = text + r.output + "\n".join(caplog.messages)
    assert _over_cap(written) == []


def prepare_all_train(meds, out, caplog, min_subjects: int):
    """`jepa-ray prepare --meds` with every subject in the training split (the statistics are all
    of theirs), logging captured at DEBUG; the CLI result, asserted successful."""
    from jepa_ray.cli import app

    with caplog.at_level(logging.DEBUG):
        r = CliRunner().invoke(
            app,
            ["prepare", "--meds", str(meds), "--out", str(out),
             f"prepare.ehr.min_subjects={min_subjects}", "prepare.split.val=0", "prepare.split.test=0"],
        )  # fmt: skip
    assert r.exit_code == 0, r.output[-2000:]
    return r
