"""EHR inputs: MEDS event parquet, a static table and an outcome table, read into per-subject arrays.

MEDS core columns: `subject_id` (int64), `time` (timestamp; null = static measurement such as
`GENDER//F`), `code` (string), `numeric_value` (float, null = no value). Exports that stray from it
are read where the meaning is clear (`_time_column`: offsets to UTC, epoch numbers by magnitude;
`_value_column`: numbers written as text) and quarantined where not. Bad rows are quarantined with
their file, row numbers and reason, a file whose column cannot be read at all with its reason; the
rest is kept. No record or message quotes a cell.

Outcome table conventions: `subject_id`; optional `index_time` (the index date of subjects without
an image); boolean or 0/1 columns are binary labels; column pairs `<name>_time` + `<name>_event`
are time-to-event outcomes. Other columns are ignored and listed in the manifest.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jepa_ray.ingest.identifiers import age_code_units, age_column, identifier_column
from jepa_ray.ingest.listing import Listing, Unread, entry_kind, list_files, not_regular_file, printable_path

logger = logging.getLogger(__name__)

US_PER_DAY = 86_400 * 1_000_000
MAX_AGE_YEARS = 90.0  # HIPAA Safe Harbor (ages over 89 are one group); prepare.ehr.max_age_years
_NAT = np.iinfo(np.int64).min  # a missing time (MEDS: a static event) in int64 microseconds
PAD_ID = 0
UNK_ID = 1


@dataclass
class Quarantined:
    """One rejected input (a file, or some rows of a file) with the reason."""

    input: str
    kind: str
    reason: str
    detail: str
    rows: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "input": self.input,
            "kind": self.kind,
            "reason": self.reason,
            "detail": self.detail,
        }
        if self.rows is not None:
            d["rows"] = self.rows
            d["count"] = len(self.rows)
        return d

    @property
    def count(self) -> int:
        return len(self.rows) if self.rows is not None else 1


@dataclass
class SubjectEvents:
    """A subject's MEDS events: timed ones sorted by time, plus static (null-time) codes."""

    times: np.ndarray  # (n,) int64 microseconds since the epoch
    codes: np.ndarray  # (n,) int32 index into EhrTables.code_names
    values: np.ndarray  # (n,) float32, NaN where the event has no value
    static_codes: np.ndarray  # (m,) int32 index into EhrTables.code_names


@dataclass
class Outcome:
    """A subject's outcome row: index time, binary labels, time-to-event pairs."""

    index_time: int | None  # microseconds since the epoch
    labels: dict[str, bool | None]
    tte: dict[str, tuple[int | None, bool | None]]
    row: int = -1  # row number in the outcome table, for quarantine records


@dataclass
class EhrTables:
    """Everything read from the EHR inputs, keyed by subject key (str of the MEDS subject_id)."""

    code_names: list[str] = field(default_factory=list)
    events: dict[str, SubjectEvents] = field(default_factory=dict)
    static: dict[str, dict[str, Any]] = field(default_factory=dict)
    static_numeric: list[str] = field(default_factory=list)
    static_categorical: list[str] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    tte_names: list[str] = field(default_factory=list)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)
    dropped_columns: list[dict[str, str]] = field(default_factory=list)  # identifiers / free text
    dropped_codes: dict[str, int] = field(default_factory=dict)  # reason -> distinct codes (never the text)
    quarantine: list[Quarantined] = field(default_factory=list)
    # MEDS files reached by a second path, read once under the first (paths relative to the root)
    skipped: list[Unread] = field(default_factory=list)
    event_rows: int = 0
    event_files: int = 0
    # every kept MEDS row, sorted by subject then time, for vectorised statistics
    row_keys: list[str] = field(default_factory=list)  # subject key per subject ordinal
    row_subject: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ordinal per row
    row_code: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    row_value: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    vocab_ids: np.ndarray | None = None  # vocabulary id per code_names entry, set by fit_vocab
    birth_codes: np.ndarray | None = None  # per code_names entry: the MEDS birth event (vocab.py)
    age_scales: np.ndarray | None = None  # per code_names entry: an age code's units per year, else NaN

    def subjects(self) -> set[str]:
        """Subjects with any EHR (events or a static row)."""
        return set(self.events) | set(self.static)


def _rel(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return path.name


def meds_files(meds: str | Path) -> Listing:
    """The event parquet files of a MEDS root (`data/**/*.parquet`), a data dir, or one file, in
    sorted path order, and the entries under the folder that are not read: the folder is listed as
    `--dicom` is (`jepa_ray.ingest.listing`: links followed, each file once, a named pipe never
    opened). A path that is neither a folder nor a regular file (a named pipe: reading it would wait
    for a writer) and a folder that cannot be listed raise InvalidEhrError naming them."""
    from jepa_ray.errors import InvalidEhrError

    p = Path(meds)
    if not p.is_dir():
        if os.path.exists(p) and not p.is_file():
            what = entry_kind(os.stat(p).st_mode)
            raise InvalidEhrError(str(p), "not_regular_file", f"{what}, not a file or folder: never opened")
        return Listing(files=[str(p)] if p.is_file() else [])
    data = p / "data" if (p / "data").is_dir() else p
    try:
        listing = list_files(data, suffix=".parquet")
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise InvalidEhrError(str(data), "unreadable_folder", f"cannot list the folder ({why})") from None
    listing.files.sort(key=Path)  # the order of a sorted rglob: rows that tie keep their file order
    return listing


def _record_unread(unread: list[Unread], root: Path, tables: EhrTables) -> None:
    """Record the entries under the MEDS folder that are not read: quarantined (kind `ehr_file`, or
    `ehr_folder` for a folder that cannot be listed) with the listing's reason, or skipped when
    read under another path."""
    for u in unread:
        rel = _rel(Path(u.path), root)
        if u.quarantined:
            kind = "ehr_file" if u.what == "file" else "ehr_folder"
            tables.quarantine.append(Quarantined(rel, kind, u.reason, u.detail))
        else:
            tables.skipped.append(replace(u, path=rel, same_as=_rel(Path(u.same_as or ""), root)))
    quarantined = sorted({u.reason for u in unread if u.quarantined})
    if quarantined:
        logger.warning(
            "under the MEDS folder, %d entries not read (%s): recorded in the quarantine",
            sum(u.quarantined for u in unread),
            ", ".join(quarantined),
        )


class _ColumnError(Exception):
    """A column that cannot be read as what it should hold: its file (or, in the outcome table, its
    values) is quarantined with `reason`; `detail` names the column and its type, never a value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _is_text(t: pa.DataType) -> bool:
    return any(
        f(t)
        for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    )


def _utf8_text(col: pa.ChunkedArray, name: str) -> tuple[pa.ChunkedArray, np.ndarray]:
    """A text-like column as strings, and a mask of the values that are not valid UTF-8 (null in the
    strings). Binary columns and string columns whose bytes are not UTF-8 (parquet does not check)
    are decoded value by value; numbers become their text."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            col.validate(full=True)
            return col.cast(pa.string()), np.zeros(len(col), dtype=bool)
        except pa.ArrowInvalid:
            col, t = col.cast(pa.large_binary() if pa.types.is_large_string(t) else pa.binary()), pa.binary()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        encoded = col.combine_chunks().dictionary_encode()
        decoded = []
        for raw in encoded.dictionary.to_pylist():  # distinct values only: codes repeat
            try:
                decoded.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                decoded.append(None)
        text = pa.array(decoded, pa.string()).take(encoded.indices)
        bad = np.asarray(pc.and_(encoded.indices.is_valid(), text.is_null()), dtype=bool)
        return pa.chunked_array([text]), bad
    if pa.types.is_null(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return col.cast(pa.string()), np.zeros(len(col), dtype=bool)
    raise _ColumnError("unsupported_column_type", f"{name} is of type {t}; expected text")


def _key_strings(col: pa.ChunkedArray, name: str = "subject_id") -> pa.ChunkedArray:
    """Subject ids as trimmed strings (the join key with DICOM PatientID); null where unusable."""
    if pa.types.is_floating(col.type):  # ids that went through a float column: keep whole numbers only
        whole = pc.and_(pc.is_finite(col), pc.equal(col, pc.floor(col)))
        col = pc.if_else(whole, pc.cast(pc.floor(col), pa.int64(), safe=False), pa.scalar(None, pa.int64()))
    text = pc.utf8_trim_whitespace(_utf8_text(col, name)[0])  # not UTF-8: null, like a missing id
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


# Integer times count from 1970-01-01 UTC in the unit their magnitude says (docs/prepare.md):
# the largest |value| below 10^11 means seconds (10^11 s is the year 5138), below 10^14
# milliseconds, below 10^17 microseconds, else nanoseconds. Within 10^8 of 0 in all of them
# (1966-1973 as seconds, one day as milliseconds) no unit can be told, and the file is quarantined.
_EPOCH_UNITS = ((10**11, 1_000_000), (10**14, 1_000), (10**17, 1))  # (below, microseconds per unit)
_EPOCH_AMBIGUOUS = 10**8
_US_PER_UNIT = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": -1_000}  # negative: divide by it
_MAX_US = 253_402_300_800 * 1_000_000  # 10000-01-01: later (or as early before 1970) is not a date


def _scale_times(raw: np.ndarray, present: np.ndarray, us_per: int) -> tuple[np.ndarray, np.ndarray]:
    """Times counted in a unit of `us_per` microseconds (negative: 1/-us_per) -> (microseconds,
    _NAT where absent or bad; mask of present values that are not finite or beyond the calendar)."""
    if raw.dtype.kind == "f":
        with np.errstate(invalid="ignore", over="ignore"):
            us_f = np.floor(raw * us_per) if us_per > 0 else np.floor(raw / -us_per)
        ok = present & np.isfinite(us_f) & (np.abs(np.nan_to_num(us_f)) <= _MAX_US)
        us = np.where(ok, np.nan_to_num(us_f), 0).astype(np.int64)
    else:
        raw = raw.astype(np.int64)
        ok = present & (np.abs(raw) <= _MAX_US // us_per) if us_per > 0 else present  # int64 ns all fit
        safe = np.where(ok, raw, 0)
        us = safe * us_per if us_per > 0 else safe // -us_per  # floor: still before what follows
    return np.where(ok, us, _NAT), present & ~ok


def _epoch_unit(raw: np.ndarray, present: np.ndarray, name: str) -> int:
    """Microseconds per unit of integer epoch times, from their magnitude (the rule above)."""
    magnitude = np.abs(raw[present].astype(np.float64))
    largest = float(np.max(magnitude[np.isfinite(magnitude)], initial=0))  # inf: a bad row, not a unit
    if largest < _EPOCH_AMBIGUOUS:
        raise _ColumnError(
            "ambiguous_time_unit",
            f"{name} holds numbers, not timestamps, all within 10^8 of 0: seconds, milliseconds, "
            "microseconds or nanoseconds since 1970 cannot be told apart; write a timestamp column",
        )
    return next((us for below, us in _EPOCH_UNITS if largest < below), -1_000)


def _parse_time_strings(text: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Date-time strings -> (microseconds, _NAT where absent or unparsable; mask of unparsable ones).
    ISO 8601 first (C speed), then any layout pandas reads. A time with an offset (`-05:00`, `Z`) is
    converted to UTC; a naive one is taken as UTC, as naive MEDS timestamps are."""
    s = text.astype(object)
    present = (s.notna() & (s.astype(str).str.strip() != "")).to_numpy()
    s = s.where(present, None)
    us = np.full(len(s), _NAT, dtype=np.int64)
    with warnings.catch_warnings():  # dateutil's warnings quote the text they could not read
        warnings.simplefilter("ignore")
        for layout in ("ISO8601", "mixed"):
            todo = present & (us == _NAT)
            if not todo.any():
                break
            try:
                parsed = pd.to_datetime(s[todo], errors="coerce", format=layout, utc=True)
                us[todo] = _utc_microseconds(parsed)
            except Exception:  # one odd value must not sink the rest: each distinct text on its own
                distinct = {v: _parse_one(v) for v in set(s[todo])}
                us[todo] = [distinct[v] for v in s[todo]]
    return us, present & (us == _NAT)


def _parse_one(value: Any) -> int:
    try:
        return int(_utc_microseconds(pd.to_datetime(pd.Series([value]), errors="coerce", utc=True))[0])
    except Exception:
        return _NAT


def _utc_microseconds(parsed: pd.Series) -> np.ndarray:
    """tz-aware (UTC) datetimes -> int64 microseconds, NaT as _NAT."""
    return parsed.dt.tz_convert(None).astype("datetime64[us]").to_numpy().view(np.int64)


def _time_column(col: pa.ChunkedArray, name: str = "time") -> tuple[np.ndarray, np.ndarray]:
    """A time column -> (microseconds since 1970-01-01 UTC, _NAT where null; mask of non-null
    values that are not a time). Timestamps (any unit; with a zone, as UTC), dates, epoch numbers
    (unit by magnitude) and date-time strings; any other type raises _ColumnError."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    present = np.asarray(col.is_valid(), dtype=bool)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        unit = "day" if pa.types.is_date32(t) else "ms" if pa.types.is_date64(t) else t.unit
        us_per = US_PER_DAY if unit == "day" else _US_PER_UNIT[unit]
        count = col.cast(pa.int32() if unit == "day" else pa.int64())  # days / units since 1970
        return _scale_times(pc.fill_null(count, 0).to_numpy(), present, us_per)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        raw = pc.fill_null(col, 0).to_numpy()
        if pa.types.is_floating(t):
            present &= ~np.isnan(raw)  # NaN is a missing time, as null is
        return _scale_times(raw, present, _epoch_unit(raw, present, name))
    if pa.types.is_null(t):
        return np.full(len(col), _NAT, dtype=np.int64), np.zeros(len(col), dtype=bool)
    if _is_text(t):
        text, undecodable = _utf8_text(col, name)
        us, bad = _parse_time_strings(text.to_pandas())
        return us, bad | undecodable
    raise _ColumnError("unsupported_column_type", f"{name} is of type {t}; expected a timestamp")


def _parse_times(raw: pd.Series, name: str) -> tuple[np.ndarray, np.ndarray]:
    """`_time_column` for a table read with pandas (the outcome table)."""
    try:
        col = pa.chunked_array([pa.array(raw, from_pandas=True)])
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed Python types: read each as text
        col = pa.chunked_array([pa.array([None if pd.isna(v) else str(v) for v in raw], pa.string())])
    return _time_column(col, name)


_NUMBER = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"  # what a text numeric_value must be to count


def _value_column(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """numeric_value -> (float64 values, null = no value; mask of text values that are not a number,
    which become null). Lab exports write values as text ("3.5", "<5", a note): numbers are read,
    anything else is counted, never quoted."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if any(f(t) for f in (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_null)):
        return col.cast(pa.float64()), np.zeros(len(col), dtype=bool)
    if _is_text(t):
        text, undecodable = _utf8_text(col, "numeric_value")
        text = pc.utf8_trim_whitespace(text)
        number = pc.fill_null(pc.match_substring_regex(text, _NUMBER), False)
        values = pc.if_else(number, text, pa.scalar(None, pa.string())).cast(pa.float64())
        given = pc.fill_null(pc.not_equal(text, ""), False)
        return values, np.asarray(pc.and_(given, pc.invert(number)), dtype=bool) | undecodable
    raise _ColumnError("unsupported_column_type", f"numeric_value is of type {t}; expected numbers")


# An age written as text: a number with an optional unit (`104`, ` 95 `, `95.0`, `104 years`, `104y`,
# `70 yo`), or an open range (`90+`, `>89`, `>= 90`, `≥90`)
_AGE = re.compile(
    r"^(?P<above>>=?|≥)?\s*(?P<n>\d+(?:\.\d*)?|\.\d+)\s*(?P<plus>\+)?\s*"
    r"(?:y|yo|y/o|yrs?|years?)?\.?(?:\s*old)?$",
    re.IGNORECASE,
)


def _age_from_text(text: str, cap: float | None) -> float | None:
    """An age written as text, in years, or None when it is not one. An open range is an age only
    when it reaches `cap` (`90+`, `>89`: the cap); below it (`65+`) the age is unknown."""
    m = _AGE.match(text)
    if m is None:
        return None
    n = float(m["n"])
    if not (m["above"] or m["plus"]):
        return n
    lowest = math.floor(n) + 1 if m["above"] == ">" else n  # ages in whole years: >89 is 90 or more
    return cap if cap is not None and lowest >= cap else None


def _age_values(s: pd.Series, cap: float | None) -> tuple[np.ndarray, np.ndarray]:
    """A static age column -> (years, NaN = missing, not yet capped; mask of values that are not an
    age, which become NaN). Numbers are read as they are, anything else as text (`_age_from_text`);
    blank text is missing. Careless exports write ages as text: it must be capped as numbers are."""
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        return s.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(s), dtype=bool)
    text = [None if pd.api.types.is_scalar(v) and pd.isna(v) else str(v).strip() for v in s.astype(object)]
    ages = {t: _age_from_text(t, cap) for t in set(text) if t}
    unreadable = np.array([bool(t) and ages[t] is None for t in text], dtype=bool)
    values = [np.nan if not t or ages[t] is None else ages[t] for t in text]
    return np.array(values, dtype=np.float64), unreadable


def _event_columns(table: pa.Table, rel: str, tables: EhrTables) -> pa.Table:
    """One file's rows as (subject, time_us, code, value), bad rows quarantined with their numbers.
    A column that cannot be read at all raises _ColumnError (the caller quarantines the file)."""
    n = table.num_rows
    keys = _key_strings(table["subject_id"])
    times, bad_time = _time_column(table["time"])
    code, bad_code = _utf8_text(table["code"], "code")
    code = pc.utf8_trim_whitespace(code)
    if "numeric_value" in table.column_names:
        value64, non_numeric = _value_column(table["numeric_value"])
        value = value64.cast(pa.float32(), safe=False)
        non_finite = pc.fill_null(pc.invert(pc.is_finite(value)), False)  # NaN, inf, beyond float32
    else:
        value = pa.nulls(n, pa.float32())
        non_finite = pa.array(np.zeros(n, dtype=bool))
        non_numeric = np.zeros(n, dtype=bool)
    checks = [
        (pc.is_null(keys), "missing_subject", "subject_id is null, empty or not UTF-8 text"),
        (bad_time, "unparsable_time", "time is not a parsable date-time"),
        (bad_code, "invalid_utf8_code", "code is not valid UTF-8 text (re-encode the export as UTF-8)"),
        (pc.fill_null(pc.equal(code, ""), True), "missing_code", "code is null or empty"),
        (
            non_finite,
            "non_finite_value",
            "numeric_value is NaN, infinite or beyond float32 (use null for no value)",
        ),
    ]
    keep = np.ones(n, dtype=bool)
    for mask, reason, detail in checks:
        bad = np.asarray(mask, dtype=bool) & keep
        if bad.any():
            tables.quarantine.append(
                Quarantined(rel, "ehr_rows", reason, detail, np.flatnonzero(bad).tolist())
            )
            keep &= ~bad
    if (non_numeric & keep).any():  # the event is kept, without its value
        tables.quarantine.append(
            Quarantined(
                rel,
                "ehr_values",
                "non_numeric_value",
                "numeric_value is text that is not a number (a bound such as <5, a note); "
                "the event is kept without a value",
                np.flatnonzero(non_numeric & keep).tolist(),
            )
        )
    out = pa.table({"subject": keys, "time": pa.array(times), "code": code, "value": value})
    return out.filter(pa.array(keep))


def age_scales(code_names: list[str]) -> np.ndarray:
    """Per code: how many of its unit make a year when it records an age
    (`identifiers.age_code_units`: AGE, AGE_MONTHS, LOINC//30525-0, ...), NaN when it does not."""
    return np.array([np.nan if (u := age_code_units(c)) is None else u for c in code_names], np.float64)


def cap_ages(values: np.ndarray, codes: np.ndarray, scales: np.ndarray, max_age_years: float) -> np.ndarray:
    """Event values with those of age codes capped at `max_age_years`, in their code's unit
    (`scales`: `age_scales`, indexed by `codes`); NaN stays missing, other codes' values as they are."""
    scale = scales[codes]
    age = ~np.isnan(scale)
    if not age.any():
        return values
    out = values.copy()
    out[age] = np.minimum(values[age], (max_age_years * scale[age]).astype(values.dtype))
    return out


def read_meds(meds: str | Path, max_age_years: float | None = MAX_AGE_YEARS) -> EhrTables:
    """Read MEDS event files into per-subject arrays; bad files and rows are quarantined. The
    values of age codes (`identifiers.age_code`) are capped at `max_age_years` here (`cap_ages`;
    None: no cap), so that every statistic and stored value comes from capped ages.

    Columnar throughout (pyarrow compute, numpy), so large extracts read at C speed.
    """
    tables = EhrTables()
    root = Path(meds) if Path(meds).is_dir() else Path(meds).parent
    listing = meds_files(meds)
    _record_unread(listing.unread, root, tables)
    files = [Path(f) for f in listing.files]
    if not files:
        tables.quarantine.append(Quarantined(str(meds), "ehr_file", "no_meds_files", "no *.parquet found"))
        return tables
    parts = []
    for path in files:
        rel = _rel(path, root)
        try:
            table = pq.read_table(path)
        except Exception as e:  # corrupt footer, not parquet, truncated ...
            tables.quarantine.append(
                Quarantined(
                    rel, "ehr_file", "unreadable_parquet", f"cannot read parquet ({type(e).__name__})"
                )
            )
            continue
        missing = [c for c in ("subject_id", "time", "code") if c not in table.column_names]
        twice = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
        if missing or twice:
            reason, detail = (
                ("missing_columns", f"MEDS columns missing: {', '.join(missing)}")
                if missing
                else ("duplicate_columns", f"columns named more than once: {', '.join(twice)}")
            )
            tables.quarantine.append(Quarantined(rel, "ehr_file", reason, detail))
            continue
        try:
            part = _event_columns(table, rel, tables)
        except _ColumnError as e:
            tables.quarantine.append(Quarantined(rel, "ehr_file", e.reason, e.detail))
            continue
        except Exception as e:  # its type only: messages can quote a cell
            tables.quarantine.append(
                Quarantined(
                    rel, "ehr_file", "unexpected_error", f"cannot read its columns ({type(e).__name__})"
                )
            )
            continue
        tables.event_files += 1
        tables.event_rows += table.num_rows
        parts.append(part)
    if not parts:
        return tables
    rows = pa.concat_tables(parts)
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("subject", "ascending"), ("time", "ascending")]))
    subjects = rows["subject"].combine_chunks().dictionary_encode()
    codes = rows["code"].combine_chunks().dictionary_encode()
    # code names sorted, so that ids do not depend on the order rows arrive in
    names = np.array(codes.dictionary.to_pylist(), dtype=object)
    order = np.argsort(names)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    tables.code_names = [str(x) for x in names[order]]
    code_index = rank[codes.indices.to_numpy()].astype(np.int32)
    times = rows["time"].to_numpy()
    values = rows["value"].to_numpy(zero_copy_only=False).astype(np.float32)  # nulls become NaN
    tables.age_scales = age_scales(tables.code_names)
    if max_age_years is not None:  # before any statistic (vocab.fit_vocab) or shard sees them
        values = cap_ages(values, code_index, tables.age_scales, max_age_years)
    subject_index = subjects.indices.to_numpy()
    starts = np.flatnonzero(np.r_[True, subject_index[1:] != subject_index[:-1]])
    bounds = [*starts.tolist(), len(subject_index)]
    keys = subjects.dictionary.to_pylist()
    for i, start in enumerate(starts):
        sl = slice(start, bounds[i + 1])
        t = times[sl]
        timed = t != _NAT
        tables.events[keys[subject_index[start]]] = SubjectEvents(
            times=t[timed],
            codes=code_index[sl][timed],
            values=values[sl][timed],
            static_codes=code_index[sl][~timed],
        )
    tables.row_subject = np.repeat(np.arange(len(starts)), np.diff(bounds))
    tables.row_keys = [keys[subject_index[st]] for st in starts]
    tables.row_code, tables.row_value = code_index, values
    logger.info("read %d MEDS rows for %d subjects from %d files", len(times), len(starts), len(files))
    return tables


def _regular_file(path: Path) -> None:
    """Refuse, unopened, a table that is not a regular file (a named pipe's open would wait for a
    writer, maybe forever; a folder would be read as a dataset of whatever it holds)."""
    what = not_regular_file(path)
    if what is not None:
        from jepa_ray.errors import InvalidEhrError

        raise InvalidEhrError(
            printable_path(str(path)), "not_regular_file", f"{what}, not a regular file: never opened"
        )


def _read_table(path: Path, kind: str, tables: EhrTables) -> pd.DataFrame | None:
    _regular_file(path)
    try:
        df = pd.read_csv(path) if path.suffix == ".csv" else pq.read_table(path).to_pandas()
    except Exception as e:
        tables.quarantine.append(
            Quarantined(
                path.name, f"{kind}_file", "unreadable_table", f"cannot read table ({type(e).__name__})"
            )
        )
        return None
    if "subject_id" not in df.columns:
        tables.quarantine.append(
            Quarantined(path.name, f"{kind}_file", "missing_columns", "no subject_id column")
        )
        return None
    try:
        ids = pa.array(df["subject_id"].tolist())
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in one column: each as text
        ids = pa.array([None if pd.isna(v) else str(v) for v in df["subject_id"]], pa.string())
    try:
        keys = _key_strings(pa.chunked_array([ids]))
    except _ColumnError as e:
        tables.quarantine.append(Quarantined(path.name, f"{kind}_file", e.reason, e.detail))
        return None
    df = df.drop(columns=["subject_id"])
    df.index = pd.Index(keys, dtype=object)
    bad = df.index.isna()
    if bad.any():
        tables.quarantine.append(
            Quarantined(
                path.name,
                f"{kind}_rows",
                "missing_subject",
                "subject_id is null, empty or not UTF-8 text",
                np.flatnonzero(bad).tolist(),
            )
        )
    dup = df.index.duplicated(keep="first") & ~bad
    if dup.any():
        tables.quarantine.append(
            Quarantined(
                path.name,
                f"{kind}_rows",
                "duplicate_subject",
                "subject appears more than once; the first row is kept",
                np.flatnonzero(dup).tolist(),
            )
        )
    df["_row"] = np.arange(len(df))
    return df[~bad & ~dup]


def _check_declared(path: Path, df: pd.DataFrame, numeric: set[str], categorical: set[str]) -> None:
    """Declared static columns must exist, be declared once, and numeric ones hold numbers (ages may
    be text: `_age_values` reads them); an age is never a category, whose values would escape the cap."""
    from jepa_ray.errors import InvalidEhrError

    present = sorted(set(df.columns) - {"_row"})
    problems = []
    if numeric & categorical:
        problems.append(f"{sorted(numeric & categorical)} declared both numeric and categorical")
    if (numeric | categorical) - set(present):
        problems.append(f"{sorted((numeric | categorical) - set(present))} declared but not in the table")
    wrong = sorted(
        c
        for c in numeric & set(present)
        if not age_column(c)
        and (not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))
    )
    if wrong:
        problems.append(f"{wrong} declared numeric but hold {[str(df[c].dtype) for c in wrong]} values")
    ages = sorted(c for c in categorical if age_column(c))
    if ages:
        problems.append(f"{ages} are ages, read as numbers to be capped: declare them in static_numeric")
    if problems:
        raise InvalidEhrError(
            str(path),
            "declared_columns",
            "; ".join(problems)
            + f" (prepare.ehr.static_numeric/static_categorical; the table has {present})",
        )


def read_static(
    path: str | Path,
    tables: EhrTables,
    numeric: list[str] | None = None,
    categorical: list[str] | None = None,
    max_age_years: float | None = MAX_AGE_YEARS,
) -> EhrTables:
    """Read the static table: numeric columns → numeric features, text/bool → categorical. With
    `numeric` or `categorical` given, only those columns, as declared (the others are dropped as
    `undeclared`). A column that looks like an identifier or free text is dropped either way. An age
    column (`identifiers.age_column`) is always numeric, also when written as text (`_age_values`:
    text that is no age becomes missing and its rows are recorded, never quoted), and capped at
    `max_age_years` here, so that every statistic and stored value comes from capped ages (None: no
    cap). A path that is not a regular file raises InvalidEhrError unopened."""
    path = Path(path)
    df = _read_table(path, "static", tables)
    if df is None:
        return tables
    declared = numeric is not None or categorical is not None
    as_number, as_category = set(numeric or ()), set(categorical or ())
    if declared:
        _check_declared(path, df, as_number, as_category)
    ignored = []
    for col in df.columns:
        if col == "_row":
            continue
        s = df[col]
        why = identifier_column(col, s)
        if why is None and declared and col not in as_number | as_category:
            why = "undeclared: not in prepare.ehr.static_numeric or prepare.ehr.static_categorical"
        if why is not None:
            tables.dropped_columns.append({"table": "static", "column": col, "reason": why})
            continue
        if age_column(col):  # a number, also when written as text, so that it can be capped
            ages, unreadable = _age_values(s, max_age_years)
            if unreadable.any():
                tables.quarantine.append(
                    Quarantined(
                        path.name,
                        "static_values",
                        "non_numeric_value",
                        f"column {col}: text that is not an age (a note, a range below the cap); "
                        "treated as missing",
                        df["_row"].to_numpy()[unreadable].tolist(),
                    )
                )
            df[col] = ages
            s = df[col]
        if col in as_category or (
            not declared
            and (
                pd.api.types.is_bool_dtype(s)
                or pd.api.types.is_object_dtype(s)
                or isinstance(s.dtype, pd.CategoricalDtype | pd.StringDtype)
            )
        ):
            tables.static_categorical.append(col)
        elif pd.api.types.is_numeric_dtype(s):
            vals = s.to_numpy(dtype=np.float64, na_value=np.nan)
            inf = np.isinf(vals)
            if inf.any():
                tables.quarantine.append(
                    Quarantined(
                        path.name,
                        "static_values",
                        "non_finite_value",
                        f"column {col}: infinite value treated as missing",
                        df["_row"].to_numpy()[inf].tolist(),
                    )
                )
                vals[inf] = np.nan
            if max_age_years is not None and age_column(col):
                vals = np.minimum(vals, max_age_years)  # NaN stays missing
            df[col] = vals
            tables.static_numeric.append(col)
        else:  # dates and the like: identifying or not meaningful as a static feature
            ignored.append(col)
    if ignored:
        tables.ignored_columns["static"] = ignored
    columns: dict[str, list[Any]] = {"_row": df["_row"].astype(int).tolist()}
    for c in tables.static_numeric:
        columns[c] = df[c].to_numpy(dtype=np.float64, na_value=np.nan).tolist()
    for c in tables.static_categorical:
        columns[c] = [None if pd.isna(v) else str(v) for v in df[c].astype(object)]
    names = list(columns)
    for key, values in zip(df.index, zip(*columns.values(), strict=True), strict=True):
        tables.static[str(key)] = dict(zip(names, values, strict=True))
    return tables


def read_outcomes(path: str | Path, tables: EhrTables) -> EhrTables:
    """Read the outcome table (labels, time-to-event pairs, optional index_time). A path that is not
    a regular file raises InvalidEhrError unopened."""
    path = Path(path)
    df = _read_table(path, "outcome", tables)
    if df is None:
        return tables
    cols = [c for c in df.columns if c != "_row"]
    tte = sorted(c[: -len("_time")] for c in cols if c.endswith("_time") and f"{c[:-5]}_event" in cols)
    used = {"index_time"} | {f"{n}_time" for n in tte} | {f"{n}_event" for n in tte}
    labels, ignored = [], []
    for c in cols:
        if c in used:
            continue
        s = df[c]
        vals = set(pd.unique(s.dropna()))
        if pd.api.types.is_bool_dtype(s) or (pd.api.types.is_numeric_dtype(s) and vals <= {0, 1}):
            labels.append(c)
        else:
            ignored.append(c)
    if ignored:
        tables.ignored_columns["outcomes"] = ignored
    tables.label_names, tables.tte_names = labels, tte
    times = {}
    for name in ["index_time", *[f"{n}_time" for n in tte]]:
        if name in df.columns:
            try:
                us, bad = _parse_times(df[name], name)
            except _ColumnError as e:  # the whole column: its values are dropped, the rows kept
                us = np.full(len(df), _NAT, dtype=np.int64)
                bad = df[name].notna().to_numpy()
                tables.quarantine.append(
                    Quarantined(
                        path.name,
                        "outcome_values",
                        e.reason,
                        f"{e.detail}; the column's values are dropped",
                        df["_row"].to_numpy()[bad].tolist(),
                    )
                )
                bad = np.zeros(len(df), dtype=bool)
            if bad.any():
                tables.quarantine.append(
                    Quarantined(
                        path.name,
                        "outcome_values",
                        "unparsable_time",
                        f"column {name} is not a parsable date-time; the value is dropped",
                        df["_row"].to_numpy()[bad].tolist(),
                    )
                )
            times[name] = us
    for n in tte:
        missing = (times[f"{n}_time"] == _NAT) & df[f"{n}_event"].notna().to_numpy()
        if missing.any():
            tables.quarantine.append(
                Quarantined(
                    path.name,
                    "outcome_values",
                    "missing_event_time",
                    f"{n}_event is set but {n}_time is missing; this outcome is dropped for the row",
                    df["_row"].to_numpy()[missing].tolist(),
                )
            )
    for i, key in enumerate(df.index):
        row = df.iloc[i]

        def t(name: str, i: int = i) -> int | None:
            v = times[name][i] if name in times else _NAT
            return None if v == _NAT else int(v)

        tables.outcomes[str(key)] = Outcome(
            index_time=t("index_time"),
            labels={c: None if pd.isna(row[c]) else bool(row[c]) for c in labels},
            tte={
                n: (t(f"{n}_time"), None if pd.isna(row[f"{n}_event"]) else bool(row[f"{n}_event"]))
                for n in tte
            },
            row=int(row["_row"]),
        )
    return tables


def read_id_map(path: str | Path) -> dict[str, str]:
    """DICOM PatientID → MEDS subject_id, from a parquet/CSV with columns patient_id, subject_id.
    A path that is not a regular file raises InvalidEhrError unopened."""
    path = Path(path)
    _regular_file(path)
    df = pd.read_csv(path, dtype=str) if path.suffix == ".csv" else pq.read_table(path).to_pandas()
    missing = {"patient_id", "subject_id"} - set(df.columns)
    if missing:
        from jepa_ray.errors import InvalidEhrError

        raise InvalidEhrError(str(path), "missing_columns", f"id map needs columns {sorted(missing)}")
    return {
        str(p).strip(): str(s).strip()
        for p, s in zip(df["patient_id"], df["subject_id"], strict=True)
        if pd.notna(p) and pd.notna(s)
    }
