"""EHR inputs: MEDS event parquet, a static table and an outcome table, read into per-subject arrays.

MEDS core columns: `subject_id` (int64), `time` (timestamp; null = static measurement such as
`GENDER//F`), `code` (string), `numeric_value` (float, null = no value). Bad rows are quarantined
with their file, row numbers and reason; the rest is kept.

Outcome table conventions: `subject_id`; optional `index_time` (the index date of subjects without
an image); boolean or 0/1 columns are binary labels; column pairs `<name>_time` + `<name>_event`
are time-to-event outcomes. Other columns are ignored and listed in the manifest.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

US_PER_DAY = 86_400 * 1_000_000
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
    event_rows: int = 0
    event_files: int = 0
    # every kept MEDS row, sorted by subject then time, for vectorised statistics
    row_keys: list[str] = field(default_factory=list)  # subject key per subject ordinal
    row_subject: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ordinal per row
    row_code: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    row_value: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    vocab_ids: np.ndarray | None = None  # vocabulary id per code_names entry, set by fit_vocab
    birth_codes: np.ndarray | None = None  # per code_names entry: the MEDS birth event (vocab.py)

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


def meds_files(meds: str | Path) -> list[Path]:
    """The event parquet files of a MEDS root (`data/**/*.parquet`), a data dir, or one file."""
    p = Path(meds)
    if p.is_file():
        return [p]
    data = p / "data" if (p / "data").is_dir() else p
    files = sorted(data.rglob("*.parquet"))
    return files


def _key_strings(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Subject ids as trimmed strings (the join key with DICOM PatientID); null where unusable."""
    if pa.types.is_floating(col.type):  # ids that went through a float column: keep whole numbers only
        whole = pc.and_(pc.is_finite(col), pc.equal(col, pc.floor(col)))
        col = pc.if_else(whole, pc.cast(pc.floor(col), pa.int64(), safe=False), pa.scalar(None, pa.int64()))
    text = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _parse_times(raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(microseconds since the epoch, NaT as int64 min; bool mask of unparsable non-null values)."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        ser = raw
        bad = np.zeros(len(ser), dtype=bool)
    else:
        raw = raw.astype(object)
        present = (raw.notna() & (raw.astype(str).str.strip() != "")).to_numpy()
        ser = pd.to_datetime(raw.where(present, None), errors="coerce", format="mixed")
        bad = present & ser.isna().to_numpy()
    if getattr(ser.dt, "tz", None) is not None:
        ser = ser.dt.tz_convert("UTC").dt.tz_localize(None)
    us = ser.astype("datetime64[us]").to_numpy().astype(np.int64)
    return us, bad


_NAT = np.iinfo(np.int64).min


def _event_columns(table: pa.Table, rel: str, tables: EhrTables) -> pa.Table:
    """One file's rows as (subject, time_us, code, value), bad rows quarantined with their numbers."""
    n = table.num_rows
    keys = _key_strings(table["subject_id"])
    times, bad_time = _parse_times(table["time"].to_pandas())
    code = pc.utf8_trim_whitespace(table["code"].cast(pa.string()))
    if "numeric_value" in table.column_names:
        value64 = table["numeric_value"].cast(pa.float64())
        non_finite = pc.fill_null(pc.invert(pc.is_finite(value64)), False)
        value = value64.cast(pa.float32(), safe=False)
    else:
        value = pa.nulls(n, pa.float32())
        non_finite = pa.array(np.zeros(n, dtype=bool))
    checks = [
        (pc.is_null(keys), "missing_subject", "subject_id is null"),
        (bad_time, "unparsable_time", "time is not a parsable date-time"),
        (pc.fill_null(pc.equal(code, ""), True), "missing_code", "code is null or empty"),
        (non_finite, "non_finite_value", "numeric_value is NaN or infinite (use null for no value)"),
    ]
    keep = np.ones(n, dtype=bool)
    for mask, reason, detail in checks:
        bad = np.asarray(mask, dtype=bool) & keep
        if bad.any():
            tables.quarantine.append(
                Quarantined(rel, "ehr_rows", reason, detail, np.flatnonzero(bad).tolist())
            )
            keep &= ~bad
    out = pa.table({"subject": keys, "time": pa.array(times), "code": code, "value": value})
    return out.filter(pa.array(keep))


def read_meds(meds: str | Path) -> EhrTables:
    """Read MEDS event files into per-subject arrays; bad files and rows are quarantined.

    Columnar throughout (pyarrow compute, numpy), so large extracts read at C speed.
    """
    tables = EhrTables()
    root = Path(meds) if Path(meds).is_dir() else Path(meds).parent
    files = meds_files(meds)
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
        if missing:
            tables.quarantine.append(
                Quarantined(rel, "ehr_file", "missing_columns", f"MEDS columns missing: {', '.join(missing)}")
            )
            continue
        tables.event_files += 1
        tables.event_rows += table.num_rows
        parts.append(_event_columns(table, rel, tables))
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


def _read_table(path: Path, kind: str, tables: EhrTables) -> pd.DataFrame | None:
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
    keys = _key_strings(pa.chunked_array([pa.array(df["subject_id"].tolist())]))
    df = df.drop(columns=["subject_id"])
    df.index = pd.Index(keys, dtype=object)
    bad = df.index.isna()
    if bad.any():
        tables.quarantine.append(
            Quarantined(
                path.name,
                f"{kind}_rows",
                "missing_subject",
                "subject_id is null",
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


_ID_NAME = re.compile(
    r"(^|_)(mrn|ssn|nhs|name|first_?name|last_?name|surname|patient_?name|address|street|city|zip|"
    r"post_?code|phone|email|dob|birth_?date|date_?of_?birth|accession|note|notes|comment|comments|text)($|_)"
)
FREE_TEXT_LEN = 48  # a categorical value longer than this is free text, not a category


FREE_TEXT_CODE_LEN = 160  # a MEDS code longer than this is a note, not a code (LOINC long names: <~150)
FREE_TEXT_CODE_WORDS = 16  # nor one of this many words (LOINC long names reach ~13)
_PERSONAL_PATTERN = re.compile(
    r"[\w.+-]+@[\w-]+\.[\w.]+"  # an e-mail address
    r"|(?<!\d)\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\d)"  # a phone number
    r"|(?<!\d)(19|20)\d\d-[01]\d-[0-3]\d(?!\d)|(?<!\d)[0-3]?\d/[0-3]?\d/(19|20)?\d\d(?!\d)"  # a date
    r"|\b\d{3}-\d{2}-\d{4}\b"  # a social security number
)


def free_text_code(code: str) -> str | None:
    """Why a MEDS code looks like free text or carries a personal detail (it is then never a
    vocabulary entry, and never written anywhere), or None for a code."""
    if len(code) > FREE_TEXT_CODE_LEN or len(code.split()) >= FREE_TEXT_CODE_WORDS:
        return "free_text"
    if _PERSONAL_PATTERN.search(code):
        return "personal_pattern"
    return None


def _check_declared(path: Path, df: pd.DataFrame, numeric: set[str], categorical: set[str]) -> None:
    """Declared static columns must exist, be declared once, and numeric ones hold numbers."""
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
        if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])
    )
    if wrong:
        problems.append(f"{wrong} declared numeric but hold {[str(df[c].dtype) for c in wrong]} values")
    if problems:
        raise InvalidEhrError(
            str(path),
            "declared_columns",
            "; ".join(problems)
            + f" (prepare.ehr.static_numeric/static_categorical; the table has {present})",
        )


def identifier_column(name: str, s: pd.Series) -> str | None:
    """Why a static column looks like an identifier or free text (and must not be copied), or None.

    By name (mrn, name, address, phone, dob, notes, ...); a text column whose values are long or
    multi-word, or mostly distinct; a numeric column of distinct integers (a record number)."""
    if _ID_NAME.search(name.strip().lower()):
        return "identifier_name: the column's name says it identifies a person or holds free text"
    values = s.dropna()
    n = len(values)
    if n == 0:
        return None
    if pd.api.types.is_object_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype | pd.StringDtype):
        text = values.astype(str)
        if (text.str.len() > FREE_TEXT_LEN).any() or (text.str.count(" ") >= 3).any():
            return "free_text: values longer than a category (or of several words)"
        distinct = text.nunique()
        if n >= 20 and distinct > 0.5 * n:
            return f"high_cardinality: {distinct} distinct values among {n} rows, like an identifier"
    elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = values.to_numpy(dtype=np.float64)
        finite = v[np.isfinite(v)]
        if (
            n >= 20
            and finite.size == n
            and np.all(finite == np.round(finite))
            and len(np.unique(finite)) == n
        ) and np.ptp(finite) >= n:  # distinct integers spread wider than a count: record numbers
            return "identifier_values: distinct integers on every row, like a record number"
    return None


def read_static(
    path: str | Path,
    tables: EhrTables,
    numeric: list[str] | None = None,
    categorical: list[str] | None = None,
) -> EhrTables:
    """Read the static table: numeric columns → numeric features, text/bool → categorical. With
    `numeric` or `categorical` given, only those columns, as declared (the others are dropped as
    `undeclared`). A column that looks like an identifier or free text is dropped either way."""
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
                df.loc[inf, col] = np.nan
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
    """Read the outcome table (labels, time-to-event pairs, optional index_time)."""
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
            us, bad = _parse_times(df[name])
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
    """DICOM PatientID → MEDS subject_id, from a parquet/CSV with columns patient_id, subject_id."""
    path = Path(path)
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
