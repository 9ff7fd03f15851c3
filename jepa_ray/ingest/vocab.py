"""EHR vocabulary and statistics (fit on the training split only), and a sample's EHR arrays."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from jepa_ray.ingest.ehr import MAX_AGE_YEARS, PAD_ID, UNK_ID, US_PER_DAY, EhrTables, age_scales, cap_ages
from jepa_ray.ingest.identifiers import age_column, free_text_code


@dataclass
class Vocab:
    """Code vocabulary and normalisation statistics, fit on the training split only."""

    codes: list[str]  # id -> code; ids 0 and 1 are <pad> and <unk>
    code_stats: dict[str, dict[str, float]]  # code -> mean, std, count of numeric values
    static_numeric: list[dict[str, Any]]  # name, mean, std, missing_fraction
    static_categorical: list[dict[str, Any]]  # name, values (id = index + 2; 0 missing, 1 unknown)

    def __post_init__(self) -> None:
        self._code_id = {c: i for i, c in enumerate(self.codes)}
        self._cat_ids = [{v: i + 2 for i, v in enumerate(f["values"])} for f in self.static_categorical]

    def code_id(self, code: str) -> int:
        return self._code_id.get(code, UNK_ID)

    def ids_for(self, code_names: list[str]) -> np.ndarray:
        """Vocabulary id of each raw code name (<unk> for codes outside the vocabulary)."""
        return np.array([self.code_id(c) for c in code_names], dtype=np.int32)

    def to_json(self) -> dict[str, Any]:
        return {
            "codes": self.codes,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "code_stats": self.code_stats,
            "static_numeric": self.static_numeric,
            "static_categorical": self.static_categorical,
        }


def fit_vocab(
    tables: EhrTables,
    train_subjects: set[str],
    min_count: int = 1,
    min_subjects: int = 1,
    max_age_years: float | None = MAX_AGE_YEARS,
) -> Vocab:
    """Fit the code vocabulary and value statistics on the training subjects' EHR. A code or a
    categorical value is kept only when `min_count` rows and `min_subjects` distinct training
    subjects have it (k-anonymity of what the manifest lists), and when it does not look like free
    text, hold a personal detail or, as an age code, name an age at or above `max_age_years` in its
    text (`free_text_code`: counted by reason in `tables.dropped_codes`, never written); a
    categorical column left with no value is dropped (recorded in `tables.dropped_columns`)."""
    in_train = np.array([k in train_subjects for k in tables.row_keys], dtype=bool)
    rows = in_train[tables.row_subject] if in_train.size else np.zeros(0, dtype=bool)
    n_codes = len(tables.code_names)
    counts = np.bincount(tables.row_code[rows], minlength=n_codes)
    if min_subjects > 1 and rows.any():  # distinct training subjects per code
        pairs = np.unique(
            tables.row_subject[rows].astype(np.int64) * n_codes + tables.row_code[rows].astype(np.int64)
        )
        holders = np.bincount((pairs % n_codes).astype(np.int64), minlength=n_codes)
        counts = np.where(holders >= min_subjects, counts, 0)
    for i, name in enumerate(tables.code_names):
        why = free_text_code(name, max_age_years)
        if why is not None:
            counts[i] = 0
            tables.dropped_codes[why] = tables.dropped_codes.get(why, 0) + 1
    has = rows & ~np.isnan(tables.row_value)
    c, v = tables.row_code[has], tables.row_value[has].astype(np.float64)
    n = np.bincount(c, minlength=n_codes)
    total = np.bincount(c, weights=v, minlength=n_codes)
    total_sq = np.bincount(c, weights=v * v, minlength=n_codes)
    kept = sorted(
        (int(i) for i in np.flatnonzero(counts >= min_count)),
        key=lambda i: (-counts[i], tables.code_names[i]),
    )
    codes = ["<pad>", "<unk>", *[tables.code_names[i] for i in kept]]
    code_stats = {}
    for i in kept:
        if n[i]:
            mean = total[i] / n[i]
            code_stats[tables.code_names[i]] = {
                "mean": float(mean),
                "std": float(np.sqrt(max(total_sq[i] / n[i] - mean * mean, 0.0))),
                "count": int(n[i]),
            }
    static_rows = [tables.static[k] for k in train_subjects if k in tables.static]
    numeric = []  # age columns and codes arrive capped (read_static, read_meds): no statistic says more
    for name in tables.static_numeric:
        v = np.array([r[name] for r in static_rows], dtype=np.float64)
        ok = v[~np.isnan(v)]
        numeric.append(
            {
                "name": name,
                "mean": float(ok.mean()) if ok.size else 0.0,
                "std": float(ok.std()) if ok.size else 1.0,
                "missing_fraction": float(1 - ok.size / max(len(v), 1)),
            }
        )
    categorical = []
    for name in list(tables.static_categorical):
        c = Counter(r[name] for r in static_rows if r[name] is not None)
        # read_static drops a column holding a personal detail; this keeps any such value out regardless
        values = sorted(
            (v for v in c if c[v] >= min_subjects and free_text_code(v, max_age_years) is None),
            key=lambda x: (-c[x], x),
        )
        if c and not values:
            tables.static_categorical.remove(name)
            tables.dropped_columns.append(
                {
                    "table": "static",
                    "column": name,
                    "reason": f"rare_values: no value is shared by {min_subjects} training subjects",
                }
            )
            continue
        categorical.append({"name": name, "values": values, "rare_values": len(c) - len(values)})
    vocab = Vocab(codes, code_stats, numeric, categorical)
    tables.vocab_ids = vocab.ids_for(tables.code_names)
    return vocab


DAYS_PER_YEAR = 365.25


def _birth_codes(tables: EhrTables) -> np.ndarray:
    """Per code_names entry: is it the MEDS birth event (cached on the tables)."""
    if tables.birth_codes is None or len(tables.birth_codes) != len(tables.code_names):
        tables.birth_codes = np.array([c.upper().startswith("MEDS_BIRTH") for c in tables.code_names], bool)
    return tables.birth_codes


def _age_scales(tables: EhrTables) -> np.ndarray:
    """Per code_names entry: an age code's units per year, else NaN (cached on the tables)."""
    if tables.age_scales is None or len(tables.age_scales) != len(tables.code_names):
        tables.age_scales = age_scales(tables.code_names)
    return tables.age_scales


def subject_ehr(
    tables: EhrTables,
    vocab: Vocab,
    key: str,
    index_time: int | None,
    max_events: int,
    time_resolution_days: float | None = None,
    max_age_years: float | None = None,
) -> dict[str, np.ndarray] | None:
    """A sample's EHR arrays: static features and the last K events strictly before `index_time`.

    Returns None when the subject has no EHR or nothing of it precedes the index time. Event
    times are in days relative to the index time (all negative), rounded down to
    `time_resolution_days` (the birth event, MEDS_BIRTH*, to whole years) and never earlier than
    `max_age_years`; static age columns (`identifiers.age_column`: AgeAtIndex, patient_age, ...) and
    the values of age codes (`identifiers.age_code`: AGE, LOINC//30525-0, ..., in their unit) are
    capped there too (`read_static` and `read_meds` cap them as they read). Values stay raw
    otherwise; the manifest's statistics normalise them downstream.
    """
    ev = tables.events.get(key)
    st = tables.static.get(key)
    if (ev is None and st is None) or index_time is None:
        return None
    out: dict[str, np.ndarray] = {}
    if ev is not None:
        n = int(np.searchsorted(ev.times, index_time, side="left"))  # strictly before the index
        lo = max(0, n - max_events)
        ids = tables.vocab_ids if tables.vocab_ids is not None else vocab.ids_for(tables.code_names)
        out["event_code"] = ids[ev.codes[lo:n]]
        days = (ev.times[lo:n] - index_time) / US_PER_DAY
        if time_resolution_days is not None:
            birth = _birth_codes(tables)[ev.codes[lo:n]]
            step = np.where(birth, DAYS_PER_YEAR, time_resolution_days)
            days = np.floor(days / step) * step  # down: an event before the index stays before it
        if max_age_years is not None:
            days = np.maximum(days, -max_age_years * DAYS_PER_YEAR)
        out["event_time"] = days.astype(np.float32)
        values = ev.values[lo:n].astype(np.float32)
        if max_age_years is not None:
            values = cap_ages(values, ev.codes[lo:n], _age_scales(tables), max_age_years)
        out["event_value"] = values
        out["static_code"] = ids[ev.static_codes]
    else:
        out["event_code"] = np.zeros(0, np.int32)
        out["event_time"] = np.zeros(0, np.float32)
        out["event_value"] = np.zeros(0, np.float32)
        out["static_code"] = np.zeros(0, np.int32)
    num = np.full(len(vocab.static_numeric), np.nan, dtype=np.float32)
    cat = np.zeros(len(vocab.static_categorical), dtype=np.int32)
    if st is not None:
        for i, f in enumerate(vocab.static_numeric):
            num[i] = st.get(f["name"], np.nan)
            if max_age_years is not None and age_column(f["name"]) and num[i] > max_age_years:
                num[i] = max_age_years
        for i, f in enumerate(vocab.static_categorical):
            v = st.get(f["name"])
            cat[i] = PAD_ID if v is None else vocab._cat_ids[i].get(v, UNK_ID)
    out["static_num"] = num
    out["static_cat"] = cat
    tokens = (
        out["event_code"].size + out["static_code"].size + int((~np.isnan(num)).sum()) + int((cat > 0).sum())
    )
    return out if tokens else None
