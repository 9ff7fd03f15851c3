"""Ages written in a MEDS code's text (`AGE//104`, `AGE_GROUP//95-99`, `AGE_BAND//90+`): an age
code whose text names an age at or above the cap (`ehr.max_age_years`) never enters the
vocabulary, however many subjects share it (`age_over_cap`, counted in `ehr.dropped_codes`); ages
under the cap, units and standard age concepts stay codes. Age names run together in capitals
(`PATIENTAGE`, `AGEATVISIT`) are ages, `DOSAGE` or `STAGE` are not; and an age band in an
age-named static column is read as an age, never kept as a category."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_ehr_hostile import _events
from test_ehr_hostile import _meds as _meds_files
from test_meds_age import _meds, _us, prepare_all_train

from jepa_ray.errors import InvalidEhrError
from jepa_ray.ingest import ehr
from jepa_ray.ingest import vocab as vocab_mod
from jepa_ray.ingest.identifiers import age_code_units, age_column, age_over_cap, free_text_code

CAP = 90.0

OVER_CAP_CODES = [
    "AGE//104",
    "AGE//95",
    "AGE//90",  # the cap itself: only as a capped value, never as a code of its own
    "AGE_GROUP//95-99",
    "AGE_GROUP//90-94",
    "AGE_GROUP//85-94",  # its upper end
    "AGE_BAND//90+",
    "AGE//>89",  # whole years: 90 and up
    "AGE//>=90",
    "AGE//≥90",
    "AGE_OVER_89",
    "AGE_GT_89",
    "AGE//<95",  # up to 94
    "Age 92",
    "AGE//104 years",
    "AGE//104y",
    "DEMOGRAPHICS//AGE//97",
    "VITAL//Age//years//95",
    "LOINC//30525-0//104",  # a standard age concept with an age after it
    "SNOMED//397669002//95",
    "AGE_MONTHS//1200",  # 100 years in months
    "AgeInDays//40000",
    "AgeInDays//36,500",  # 100 years, with a thousands separator
    "PATIENTAGE//97",  # an age name run together
    "AGEGROUP//95-99",
]
UNDER_CAP_CODES = [
    "AGE",
    "AGE//mo",
    "AGE_AT_ADMISSION",
    "LOINC//30525-0",
    "LOINC/29553-5",
    "SNOMED//397669002",
    "LOINC//21612-7//a",
    "AGE_GROUP//18-64",
    "AGE_GROUP//85-89",
    "AGE//45",
    "AGE//89",
    "AGE//89.5",
    "AGE//89+",  # an open range from below the cap: coarser than 90+
    "AGE_OVER_65",
    "AGE//<90",  # up to 89
    "AGE//<=89",
    "AGE_UNDER_18",
    "AGE_MONTHS//95",  # 8 years in months
    "AgeInDays//95",
    "AGE_GROUP//18,64",  # not a thousands separator
    "AGEINMONTHS//1000",  # 83 years in months
]
NOT_AGE_CODES = ["DOSAGE//100", "STAGE//IV", "LAB//PAGE//95", "LAB//50931//mg/dL", "SNOMED//44054006"]
SHOWN = re.compile(r"(?<![\w.])(?:104|97|92)(?![\w.])|95-99|90-94|85-94|90\+|>89|\\u003e89|>=90|≥90|OVER_89")


def _shown(text: str) -> list[str]:
    """Where an over-cap age of OVER_CAP_CODES shows in `text`."""
    return SHOWN.findall(text)


# --- which codes name an age over the cap ---------------------------------------------------------


@pytest.mark.parametrize("code", OVER_CAP_CODES)
def test_an_age_code_naming_an_age_at_or_over_the_cap_is_dropped(code):
    assert age_over_cap(code, CAP)
    assert free_text_code(code, CAP) == "age_over_cap"


@pytest.mark.parametrize("code", UNDER_CAP_CODES + NOT_AGE_CODES)
def test_ages_under_the_cap_units_concepts_and_other_codes_are_kept(code):
    assert not age_over_cap(code, CAP)
    assert free_text_code(code, CAP) is None


def test_the_cap_is_the_one_given():
    assert not age_over_cap("AGE//95", 100.0) and age_over_cap("AGE//104", 100.0)
    assert age_over_cap("AGE//85", 80.0) and not age_over_cap("AGE_GROUP//75-79", 80.0)
    assert free_text_code("AGE//104") is None  # no cap given: no age check


# --- age names run together -----------------------------------------------------------------------

RUN_TOGETHER_AGES = [
    "PATIENTAGE",
    "AGEATVISIT",
    "AGEYEARS",
    "AGEYRS",
    "AGEATADMISSION",
    "AGEATINDEX",
    "AGEATDEATH",
    "AGEATONSET",
    "AGEATDIAGNOSIS",
    "AGEATDX",
    "AGEATENCOUNTER",
    "AGEINYEARS",
    "PATIENTAGEATVISIT",
    "CURRENTAGE",
    "BASELINEAGE",
    "AGEGROUP",
    "AGEBAND",
    "patientage",
    "ageatvisit",
]
# words that end or start with `age` (and run-together names built on them) but are no age
NOT_AGES = [
    *("DOSAGE", "STAGE", "PAGE", "MANAGE", "AGENT", "IMAGE", "AVERAGE", "USAGE", "PACKAGE", "GARAGE"),
    *("TEENAGE", "MESSAGE", "VOLTAGE", "PERCENTAGE", "LINEAGE", "LEAKAGE", "AGENDA", "AGED", "AGENCY"),
    *("PASSAGE", "POSTAGE", "SHORTAGE", "MILEAGE", "DAMAGE", "HEMORRHAGE", "DRAINAGE", "LAVAGE"),
    *("BANDAGE", "CARTILAGE", "TRIAGE", "OUTAGE", "OVERAGE", "UNDERAGE", "COVERAGE", "STORAGE"),
    *("LANGUAGE", "MONTAGE", "HOSTAGE", "LINKAGE", "BLOCKAGE", "SEEPAGE", "FOOTAGE", "AGEUSIA"),
    *("AGENESIS", "AGEING", "AGELESS", "STAGEATDIAGNOSIS", "DOSAGEINDAYS", "STAGEINDEX", "PAGECOUNT"),
    *("MANAGEMENT", "IMAGEINDEX", "SUBJECTIMAGE", "DXSTAGE", "PTSTAGE", "GROUPAGE"),
]


@pytest.mark.parametrize("name", RUN_TOGETHER_AGES)
def test_an_age_name_run_together_with_a_known_word_is_an_age(name):
    assert age_column(name)
    assert age_over_cap(f"{name}//104", CAP)


@pytest.mark.parametrize("name", NOT_AGES)
def test_a_word_that_only_contains_age_is_no_age(name):
    assert not age_column(name) and not age_column(name.lower())
    assert age_code_units(name) is None
    assert not age_over_cap(f"{name}//104", CAP)


@pytest.mark.parametrize(
    "code",
    [
        "LAB//Age-adjusted D-dimer//ng/mL",
        "LAB//Age-adjusted eGFR//104",
        "egfr_age_adjusted",
        "PSA age specific",
    ],
)
def test_a_quantity_qualified_by_age_is_no_age_and_keeps_its_values(code):
    # an age-adjusted eGFR of 104 is a kidney function, not a 104-year-old: never capped or dropped
    assert not age_column(code)
    assert age_code_units(code) is None
    assert free_text_code(code, 90.0) is None
    values = ehr.cap_ages(np.array([104.0], np.float32), np.array([0]), ehr.age_scales([code]), 90.0)
    assert values[0] == 104.0


def test_a_run_together_age_names_its_unit():
    assert age_code_units("AGEINMONTHS") == 12.0
    assert age_code_units("PATIENTAGEDAYS") == 365.25
    assert age_code_units("AGEATVISIT") == 1.0


# --- the vocabulary -------------------------------------------------------------------------------


def test_over_cap_age_codes_shared_by_every_subject_never_reach_the_vocabulary(tmp_path):
    kept = UNDER_CAP_CODES + NOT_AGE_CODES
    codes = OVER_CAP_CODES + kept
    t = pa.array([_us("2016-01-01")] * len(codes), pa.timestamp("us"))
    meds = _meds_files(tmp_path, **{f"s{s}": _events(s, t, codes) for s in (1, 2, 3)})
    tables = ehr.read_meds(meds, max_age_years=CAP)
    vocab = vocab_mod.fit_vocab(tables, {"1", "2", "3"}, min_subjects=2, max_age_years=CAP)
    assert sorted(vocab.codes[2:]) == sorted(kept)
    assert tables.dropped_codes == {"age_over_cap": len(OVER_CAP_CODES)}
    ids = dict(zip(tables.code_names, tables.vocab_ids.tolist(), strict=True))
    assert {ids[c] for c in OVER_CAP_CODES} == {ehr.UNK_ID}  # written as <unk>
    assert _shown(json.dumps(vocab.to_json())) == []


def test_the_vocabulary_uses_the_cap_it_is_given(tmp_path):
    codes = ["AGE//95", "AGE//104"]
    t = pa.array([_us("2016-01-01")] * 2, pa.timestamp("us"))
    tables = ehr.read_meds(_meds_files(tmp_path, s1=_events(1, t, codes)), max_age_years=100.0)
    vocab = vocab_mod.fit_vocab(tables, {"1"}, max_age_years=100.0)
    assert vocab.codes[2:] == ["AGE//95"] and tables.dropped_codes == {"age_over_cap": 1}
    default = ehr.read_meds(tmp_path / "meds")
    assert vocab_mod.fit_vocab(default, {"1"}).codes[2:] == []  # by default, ehr.MAX_AGE_YEARS


# --- age bands in the static table ----------------------------------------------------------------


def test_an_age_band_in_an_age_named_static_column_is_never_a_category(tmp_path):
    bands = ["95-99", "90+", ">89", "85-89"] * 3
    path = tmp_path / "static.csv"
    pd.DataFrame(
        {"subject_id": range(1, 13), "age_group": bands, "AGEBAND": bands, "sex": ["F", "M"] * 6}
    ).to_csv(path, index=False)
    tables = ehr.read_static(path, ehr.EhrTables(), max_age_years=CAP)
    assert tables.static_categorical == ["sex"]
    assert tables.static_numeric == ["age_group", "AGEBAND"]
    # 90+ and >89 are the cap; a band is no age: missing, its rows recorded, never quoted
    assert {tables.static[str(k)]["age_group"] for k in (2, 3)} == {CAP}
    assert all(pd.isna(tables.static[str(k)]["age_group"]) for k in (1, 4))
    assert {q.reason for q in tables.quarantine} == {"non_numeric_value"}
    vocab = vocab_mod.fit_vocab(tables, set(tables.static), max_age_years=CAP)
    written = json.dumps(vocab.to_json()) + json.dumps([q.to_json() for q in tables.quarantine])
    assert _shown(written) == []
    with pytest.raises(InvalidEhrError, match="are ages"):
        ehr.read_static(path, ehr.EhrTables(), categorical=["AGEBAND", "sex"])


# --- through prepare: the manifest, the log and the console ---------------------------------------


def test_no_over_cap_age_code_reaches_the_outputs_of_prepare(ray_session, tmp_path, caplog):

    over = ["AGE//104", "AGE_GROUP//95-99", "AGE_BAND//90+", "AGE//>89", "Age 92", "DEMOGRAPHICS//AGE//97"]
    kept = ["AGE_GROUP//18-64", "AGE//45", "AGE//mo", "AGE_AT_ADMISSION"]
    subjects = list(range(101, 113))
    meds = _meds(tmp_path, {c: [50.0] * len(subjects) for c in over + kept}, subjects)
    out = tmp_path / "out"
    r = prepare_all_train(meds, out, caplog, min_subjects=2)
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    assert set(manifest["ehr"]["codes"][2:]) == {*kept, "LAB//CRP"}
    assert manifest["ehr"]["dropped_codes"] == {"age_over_cap": len(over)}
    # the log's messages, not its formatted lines: a record stamped at milliseconds 104 is no age
    assert _shown(text + r.output + "\n".join(caplog.messages)) == []
    for p in (p for p in out.rglob("*") if p.is_file()):
        data = p.read_bytes()
        assert not any(s.encode() in data for s in ["95-99", "90+", ">89", "Age 92", "AGE//97"]), p.name
