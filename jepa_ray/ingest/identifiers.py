"""Personal data by its shape: which MEDS codes, category values and static columns identify someone.

EHR text reaches the manifest (the vocabulary) and the shards only as codes and category values;
these checks decide which text is not a code or a category. They read shapes, never look anyone
up, and name a reason, never the text. Codes are `//`-separated (MEDS): the first part names the
vocabulary (`SNOMED//44054006`, `LAB//51221//mg/dL`). What counts as what is listed in
docs/privacy.md; keep the two in step.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd

FREE_TEXT_LEN = 48  # a categorical value longer than this is free text, not a category
FREE_TEXT_CODE_LEN = 160  # a MEDS code longer than this is a note, not a code (LOINC long names: <~150)
FREE_TEXT_CODE_WORDS = 16  # nor one of this many words (LOINC long names reach ~13)

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
# Shapes that are personal wherever they appear, in a code or a category value.
_PERSONAL = re.compile(
    "|".join(
        [
            r"[\w.+-]+@[\w-]+\.[\w.-]+",  # an e-mail address
            r"\bhttps?://|\bwww\.",  # a web address
            # phone numbers
            r"(?<![\w+])\+\d(?:[ .()/-]{0,2}\d){7,14}(?!\d)",  # international: +44 20 7946 0958
            r"(?<!\d)(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)",  # (555) 123-4567, 555.123.4567
            r"(?<![\d.-])[2-9]\d\d[.-]\d{4}(?![\d.-])",  # local (exchanges start 2-9): 555-0100, 555.0100
            r"(?<![\d.])0\d{1,4}(?: \d{2,4}){2,4}(?![\d.])",  # national, spaced: 020 7946 0958
            # dates (a year alone is not one)
            r"(?<!\d)(?:19|20)\d\d(?P<iso>[-/.])[01]?\d(?P=iso)[0-3]?\d(?!\d)",  # 2013-04-15, 2013/4/15, 2013.04.15
            r"(?<![\d.])[0-3]?\d/[0-3]?\d/(?:19|20)?\d\d(?![\d.])",  # 4/15/2013, 15/4/13
            r"(?<![\d.])[0-3]?\d(?P<dmy>[.-])[0-3]?\d(?P=dmy)(?:19|20)\d\d(?![\d.])",  # 15.04.2013, 04-15-2013
            rf"\b\d{{1,2}}(?:st|nd|rd|th)?[ .-]*{_MONTH}\.?,?[ .-]*(?:\d{{4}}|\d\d)\b",  # 15 Apr 2013, 15-Apr-13
            rf"\b{_MONTH}\.?[ -]+\d{{1,2}}(?:st|nd|rd|th)?,?[ -]+(?:\d{{4}}|\d\d)\b",  # April 15 2013
            rf"\b{_MONTH}\.?,?[ -]+(?:19|20)\d\d\b",  # April 2013
            # social security and record numbers
            r"(?<!\d)\d{3}(?P<ssn>[- ])\d{2}(?P=ssn)\d{4}(?!\d)",  # 123-45-6789, 123 45 6789
            r"mrn\W*\d{3,}",  # MRN 0042, XYZMRN0042
        ]
    ),
    re.IGNORECASE,
)
# Digit shapes that real vocabularies also use (SNOMED CT ids have 6-18 digits, NDC 10-11, OMOP
# concept ids up to 10): personal only where no part of the code names such a vocabulary.
_DIGIT_RUN = re.compile(r"(?<![\d.])\d{9,}(?!\d)")  # an SSN, phone or record number without separators
_COMPACT_DATE = re.compile(
    r"(?<!\d)(?:(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"  # 20130415
    r"|(?:0[1-9]|[12]\d|3[01])(?:0[1-9]|1[0-2])(?:19|20)\d\d"  # 15042013
    r"|(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?:19|20)\d\d)(?!\d)"  # 04152013
)
_NUMERIC_VOCABULARY = re.compile(
    r"^(?:snomed\w*|sct\w*|rx_?norm\w*|rxcui|ndc\w*|loinc\w*|cpt\w*|hcpcs\w*|icd\w*|omop\w*|concept\w*"
    r"|meddra\w*|cvx|din|pzn|atc)$"
)
# Words that make a column (or a code vocabulary) identifying: people, contact, place, dates, free text.
IDENTIFYING_WORDS = frozenset(
    {
        *("name", "names", "firstname", "lastname", "surname", "fullname", "givenname", "familyname"),
        *("maidenname", "initials", "mrn", "ssn", "nhs", "accession", "passport", "license", "licence"),
        *("phone", "telephone", "tel", "mobile", "cellphone", "fax", "pager", "email", "contact"),
        *("address", "street", "city", "town", "county", "zip", "zipcode", "postcode", "postalcode"),
        *("geocode", "latitude", "longitude"),
        *("date", "dates", "dob", "birthdate", "birthday", "dt", "dttm", "datetime", "timestamp"),
        *("yyyymmdd", "ddmmyyyy", "mmddyyyy", "ymd"),
        *("note", "notes", "comment", "comments", "text", "remark", "remarks", "narrative"),
    }
)


def name_words(name: str) -> list[str]:
    """A column or vocabulary name as lower-case words: `AgeAtIndex` -> age, at, index;
    `zip5` -> zip, 5; `PCPContact` -> pcp, contact; `e-mail` -> e, mail."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", spaced)
    return re.findall(r"[a-z]+|\d+", spaced.lower())


def identifying_name(name: str) -> bool:
    """Does a column's name say it holds an identifier, a place, a date or free text (a word of
    it, or two adjacent words joined: `e-mail`, `zip code`, `birth date`)?"""
    words = name_words(name)
    terms = set(words) | {a + b for a, b in itertools.pairwise(words)}
    return bool(terms & IDENTIFYING_WORDS)


# Words that exports run together with `age` in an all-caps or lower-case name (PATIENTAGE,
# AGEATVISIT, AGEINMONTHS, AGEGROUP). A word is an age name only when all that is left around `age`
# is made of these (at most two each side), so dosage, stage, page, manage, agent, image, average,
# usage, package or teenage never are. Keep them to words no English -age word is built from.
AGE_NAME_WORDS = frozenset(
    {
        *("patient", "pt", "subject", "person", "current", "baseline", "index", "study", "enrollment"),
        *("visit", "admission", "admit", "encounter", "exam", "scan", "surgery", "procedure"),
        *("death", "onset", "diagnosis", "dx", "at", "in"),
        *("years", "yrs", "yr", "months", "mos", "weeks", "wks", "days", "hours", "hrs"),
    }
)
AGE_NAME_WORDS_AFTER = AGE_NAME_WORDS | {"group", "band", "range", "bracket", "category"}  # not bandage


def _known_words(text: str, words: frozenset[str], most: int = 2) -> list[str] | None:
    """`text` as at most `most` of `words` (`atvisit` -> at, visit), or None."""
    if not text:
        return []
    if most == 0:
        return None
    for i in range(len(text), 0, -1):
        rest = _known_words(text[i:], words, most - 1) if text[:i] in words else None
        if rest is not None:
            return [text[:i], *rest]
    return None


def _age_name_words(word: str) -> list[str]:
    """A lower-case word split where it runs `age` together with AGE_NAME_WORDS (`patientage` ->
    patient, age; `ageinmonths` -> age, in, months); any other word as it is (`dosage`)."""
    for m in re.finditer("(?=age)", word):
        before = _known_words(word[: m.start()], AGE_NAME_WORDS)
        after = _known_words(word[m.start() + 3 :], AGE_NAME_WORDS_AFTER)
        if before is not None and after is not None and (before or after):
            return [*before, "age", *after]
    return [word]


# `age` followed by one of these qualifies another quantity (an age-adjusted eGFR, an age-specific
# reference range): not an age, so its values are never capped as one
AGE_QUALIFIERS = frozenset(
    {"adjusted", "adj", "corrected", "related", "specific", "standardized", "standardised", "matched"}
)


def age_column(name: str) -> bool:
    """Is this static column an age: a word of its name is `age` (AgeAtIndex, patient_age,
    age_years; not dosage or stage), also run together with AGE_NAME_WORDS (PATIENTAGE, AGEATVISIT),
    and not qualifying another quantity (`AGE_QUALIFIERS`: age-adjusted eGFR)?"""
    words = [w for x in name_words(name) for w in _age_name_words(x)]
    return any(
        w in ("age", "ages") and (i + 1 == len(words) or words[i + 1] not in AGE_QUALIFIERS)
        for i, w in enumerate(words)
    )


# Standard concepts whose value is a person's age, as a part of a MEDS code under any vocabulary
# name (`LOINC//30525-0`, `SNOMEDCT//397669002`, `LOINC/21612-7`): their values are capped as ages.
AGE_CONCEPT_CODES = frozenset(
    {
        "30525-0",  # LOINC: Age
        "21611-9",  # LOINC: Age - Estimated
        "21612-7",  # LOINC: Age - Reported
        "29553-5",  # LOINC: Age calculated
        "30972-4",  # LOINC: Age at onset of adverse event
        "397669002",  # SNOMED CT: Age
        "424144002",  # SNOMED CT: Current chronological age
        "445518008",  # SNOMED CT: Age at onset
    }
)
# An age code's unit, by a word of the code: how many of the unit make a year. Years are the
# default, and win over any other unit named beside them (the lower cap: never more than the cap).
AGE_UNITS_PER_YEAR = {
    **dict.fromkeys(("year", "years", "yr", "yrs", "y", "yo", "a"), 1.0),  # a: UCUM annum
    **dict.fromkeys(("month", "months", "mo", "mos", "mth", "mths"), 12.0),
    **dict.fromkeys(("week", "weeks", "wk", "wks"), 365.25 / 7),
    **dict.fromkeys(("day", "days", "d"), 365.25),
    **dict.fromkeys(("hour", "hours", "hr", "hrs", "h"), 365.25 * 24),
}


def age_code(code: str) -> bool:
    """Does this MEDS code record a person's age: a `//`-separated part of it is an age name
    (`age_column`: AGE, AGE_AT_ADMISSION, Age at visit, DEMOGRAPHICS//AGE; not DOSAGE, STAGE,
    LAB//PAGE), or a part between slashes is one of `AGE_CONCEPT_CODES` (LOINC//30525-0)?"""
    if any(age_column(p) for p in code.split("//")):
        return True
    return any(p.strip() in AGE_CONCEPT_CODES for p in re.split(r"/+", code))


def age_code_units(code: str) -> float | None:
    """How many of its unit make a year when this MEDS code records an age (`age_code`), else
    None. The unit is the last word of a part (`AGE_MONTHS`, `AGE//mo`, `LOINC//30525-0//d`,
    `Age (days)`) or a word after `in` (`AgeInMonths`, `age in weeks`), by `AGE_UNITS_PER_YEAR`;
    with none, or with years named too, years (1)."""
    if not age_code(code):
        return None
    units = set()
    for part in code.split("//"):
        words = [w for x in name_words(part) for w in _age_name_words(x)]
        named = words[-1:] + [w for prev, w in itertools.pairwise(words) if prev == "in"]
        units |= {AGE_UNITS_PER_YEAR[w] for w in named if w in AGE_UNITS_PER_YEAR}
    return min(units, default=1.0)


# A number in an age code's text and what bounds it: `>89`, `over 89`, `AGE_GT_89` (ages above
# it), `<95`, `under 95` (ages below it); otherwise the number itself is an age it names (`95`,
# `>=90`, `90+`, either end of `90-94`).
_AGE_NUMBER = re.compile(
    r"(?:(?P<above>>(?!=)|(?<![a-z])(?:over|above|gt|(?:older|greater|more)[\s_]*than)(?![a-z]))"
    r"|(?P<below><(?!=)|(?<![a-z])(?:under|below|lt|(?:younger|less)[\s_]*than)(?![a-z])))?"
    r"[\s_:=-]*(?P<n>\d{1,3}(?:,\d{3})+(?![\d,])|\d+(?:\.\d+)?)",  # 36,500 days: one number
    re.IGNORECASE,
)


def age_over_cap(code: str, max_age_years: float) -> bool:
    """Does this MEDS code record an age (`age_code`) and its text name one at or above
    `max_age_years`, in the code's unit (`age_code_units`): `AGE//104`, `Age 92`,
    `AGE_GROUP//95-99`, `AGE_BAND//90+`, `AGE//>89`, `AGE_MONTHS//1200`; not `AGE_GROUP//85-89`,
    `AGE//89+`, `AGE//<90`, `AGE_MONTHS//95`? A standard age concept (`LOINC//30525-0`) is no age.
    Whole years: `>89` names 90 and up, `<95` up to 94."""
    units = age_code_units(code)
    if units is None:
        return False
    text = "/".join(p for p in re.split(r"/+", code) if p.strip() not in AGE_CONCEPT_CODES)
    for m in _AGE_NUMBER.finditer(text):
        n = float(m["n"].replace(",", ""))
        named = math.floor(n) + 1 if m["above"] else math.ceil(n) - 1 if m["below"] else n
        if named >= max_age_years * units:
            return True
    return False


def personal_text(text: str, numeric_vocabulary: bool = False) -> bool:
    """Does this text hold an e-mail or web address, a phone, social security or record number,
    or a date? Long digit runs and undelimited dates count too, unless `numeric_vocabulary`."""
    if _PERSONAL.search(text):
        return True
    return not numeric_vocabulary and bool(_DIGIT_RUN.search(text) or _COMPACT_DATE.search(text))


def free_text_code(code: str, max_age_years: float | None = None) -> str | None:
    """Why a MEDS code looks like free text or carries a personal detail (it is then never a
    vocabulary entry, and never written anywhere), or None for a code. With `max_age_years`, an
    age code whose text names an age at or above it (`age_over_cap`) is one too."""
    if len(code) > FREE_TEXT_CODE_LEN or len(code.split()) >= FREE_TEXT_CODE_WORDS:
        return "free_text"
    parts = code.split("//")
    numeric = any(_NUMERIC_VOCABULARY.match("".join(name_words(p))) for p in parts[:-1])
    if personal_text(code, numeric_vocabulary=numeric):
        return "personal_pattern"
    if len(parts) > 1 and "".join(name_words(parts[0])) in IDENTIFYING_WORDS:
        return "identifier_vocabulary"  # SSN//…, MRN//…, PHONE//…, NOTE//…: whatever follows
    if max_age_years is not None and age_over_cap(code, max_age_years):
        return "age_over_cap"  # AGE//104, AGE_GROUP//95-99: HIPAA Safe Harbor, as capped values are
    return None


def identifier_column(name: str, s: pd.Series) -> str | None:
    """Why a static column looks like an identifier, a date or free text (and must not be copied),
    or None. By name (`identifying_name`); a text column whose values are long or multi-word,
    hold a personal detail (`personal_text`) or are mostly distinct; a numeric column of whole
    numbers shaped like yyyymmdd dates, or of distinct integers (a record number). The reason
    names the rule, never a value."""
    if identifying_name(name):
        return "identifier_name: the column's name says it identifies a person, a place or a date, or holds free text"
    values = s.dropna()
    n = len(values)
    if n == 0:
        return None
    if pd.api.types.is_object_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype | pd.StringDtype):
        text = values.astype(str)
        if (text.str.len() > FREE_TEXT_LEN).any() or (text.str.count(" ") >= 3).any():
            return "free_text: values longer than a category (or of several words)"
        if any(personal_text(v) for v in text.unique()):
            return "personal_values: values hold a date, phone number, e-mail address or identifier-shaped number"
        distinct = text.nunique()
        if n >= 20 and distinct > 0.5 * n:
            return f"high_cardinality: {distinct} distinct values among {n} rows, like an identifier"
    elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = values.to_numpy(dtype=np.float64)
        finite = v[np.isfinite(v)]
        whole = finite.size == n and bool(np.all(finite == np.round(finite)))
        if whole and _yyyymmdd_dates(finite):
            return "date_values: whole numbers shaped like yyyymmdd dates"
        if (whole and n >= 20 and len(np.unique(finite)) == n) and np.ptp(finite) >= n:
            return "identifier_values: distinct integers on every row, like a record number"
    return None


def _yyyymmdd_dates(v: np.ndarray) -> bool:
    """Are all these whole numbers calendar dates written as yyyymmdd (1900-2099)?"""
    if not np.all((v >= 19000101) & (v <= 20991231)):
        return False
    parsed = pd.to_datetime(pd.Series(v.astype(np.int64).astype(str)), format="%Y%m%d", errors="coerce")
    return bool(parsed.notna().all())
