"""Ages in the static table and the static and outcome tables as files: an age over the cap never
reaches the outputs, whether it is written as a number or as text, nor through a statistic; and a
path that is not a regular file (a named pipe, a socket, a device, a folder) is refused unopened
by the readers themselves, not only by `prepare`."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jepa_ray.errors import InvalidEhrError
from jepa_ray.ingest import ehr
from jepa_ray.ingest import vocab as vocab_mod

CAP = 90.0
UNREADABLE = "ZQAGEUNKNOWN"  # an age column's text that is no age: never written anywhere
OVER_CAP_TEXT = ["104", " 95 ", "95.0", "90+", ">89", "104 years", "104y"]


def _us(text: str) -> int:
    return int(np.datetime64(text, "us").astype(np.int64))


_OVER_CAP = re.compile(r"(?<![\w.])(?:104|95|97)(?![\w])|90\+|>89")


def _over_cap(text: str) -> list[str]:
    """Where an over-cap age (104, 95, 97; 90+ and >89 as written) shows in `text`."""
    return _OVER_CAP.findall(text)


def _static(path: Path, ages: list, **more: list) -> Path:
    df = pd.DataFrame({"subject_id": range(1, len(ages) + 1), "AgeAtIndex": ages, **more})
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return path


def _fit(tables: ehr.EhrTables) -> tuple[vocab_mod.Vocab, dict[str, list[float]]]:
    """The vocabulary fit on every subject, and each subject's stored static numbers."""
    vocab = vocab_mod.fit_vocab(tables, set(tables.static))
    idx = _us("2020-01-01")
    rows = {
        k: vocab_mod.subject_ehr(tables, vocab, k, idx, 8, max_age_years=CAP)["static_num"].tolist()
        for k in tables.static
    }
    return vocab, rows


# --- statistics come from the capped ages ---------------------------------------------------------


def test_age_statistics_and_stored_values_come_from_capped_ages(tmp_path):
    ages = [104.0, 40.0, 55.0, 70.0, 62.0, 48.0]
    tables = ehr.read_static(_static(tmp_path / "s.parquet", ages), ehr.EhrTables(), max_age_years=CAP)
    vocab, rows = _fit(tables)
    assert tables.static["1"]["AgeAtIndex"] == CAP  # what later readers of the tables see
    assert rows["1"] == [CAP]
    [stats] = vocab.to_json()["static_numeric"]
    capped = np.minimum(ages, CAP)
    assert stats["mean"] == pytest.approx(capped.mean()) and stats["std"] == pytest.approx(capped.std())
    uncapped = np.array(ages)
    assert stats["mean"] != pytest.approx(uncapped.mean()) and stats["std"] != pytest.approx(uncapped.std())
    assert _over_cap(json.dumps(vocab.to_json())) == []


# --- an age written as text -----------------------------------------------------------------------


@pytest.mark.parametrize("form", OVER_CAP_TEXT)
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_an_age_written_as_text_is_read_as_a_number_and_capped(tmp_path, caplog, form, suffix):
    ages = [form, "45", " 60.5 ", "70 years", UNREADABLE, None]
    with caplog.at_level(logging.DEBUG):
        tables = ehr.read_static(
            _static(tmp_path / f"s{suffix}", ages, sex=["F", "M"] * 3), ehr.EhrTables(), max_age_years=CAP
        )
        vocab, rows = _fit(tables)
    assert tables.static_numeric == ["AgeAtIndex"] and tables.static_categorical == ["sex"]
    stored = [rows[k][0] for k in "123456"]
    assert stored[:4] == [CAP, 45.0, 60.5, 70.0] and np.isnan(stored[4:]).all()
    assert [(q.kind, q.reason, q.rows) for q in tables.quarantine] == [
        ("static_values", "non_numeric_value", [4])
    ]
    written = json.dumps(vocab.to_json()) + json.dumps([q.to_json() for q in tables.quarantine])
    # the log's messages, not its formatted lines: a record stamped at milliseconds 104 is no age
    written += json.dumps(tables.dropped_columns) + "\n".join(caplog.messages)
    assert _over_cap(written) == [] and UNREADABLE not in written
    assert vocab.to_json()["static_numeric"][0]["mean"] == pytest.approx(np.mean([CAP, 45.0, 60.5, 70.0]))


def test_an_open_range_below_the_cap_is_no_age(tmp_path):
    tables = ehr.read_static(
        _static(tmp_path / "s.parquet", ["65+", ">70", "≥ 90", ">= 91 yrs", "89.5"]),
        ehr.EhrTables(),
        max_age_years=CAP,
    )
    values = [tables.static[k]["AgeAtIndex"] for k in "12345"]
    assert np.isnan(values[:2]).all() and values[2:] == [CAP, CAP, 89.5]
    assert [(q.reason, q.rows) for q in tables.quarantine] == [("non_numeric_value", [0, 1])]


def test_a_declared_age_column_is_a_number_even_when_written_as_text(tmp_path):
    path = _static(tmp_path / "s.parquet", ["104", "45"], sex=["F", "M"])
    tables = ehr.read_static(path, ehr.EhrTables(), numeric=["AgeAtIndex"], categorical=["sex"])
    assert [tables.static[k]["AgeAtIndex"] for k in "12"] == [CAP, 45.0]  # capped at 90 by default
    with pytest.raises(InvalidEhrError, match=r"\['AgeAtIndex'\] are ages.*static_numeric"):
        ehr.read_static(path, ehr.EhrTables(), categorical=["AgeAtIndex", "sex"])


# --- through prepare: the manifest, the shards, the log and the console ---------------------------


def test_no_over_cap_age_reaches_the_outputs_of_prepare(ray_session, tmp_path, caplog):
    from jepa_ray.cli import app
    from jepa_ray.shards.format import decode_npz

    subjects = list(range(101, 113))
    data = tmp_path / "meds" / "data"
    data.mkdir(parents=True)
    t0 = _us("2016-01-01")
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(subjects, pa.int64()),
                "time": pa.array([t0] * len(subjects), pa.timestamp("us")),
                "code": ["LAB//CRP"] * len(subjects),
            }
        ),
        data / "events.parquet",
    )
    static = pd.DataFrame(
        {
            "subject_id": subjects,
            "AgeAtIndex": [104.0, 40.0, 45.0, 50.0, 55.0, 60.0, 62.0, 64.0, 66.0, 68.0, 70.0, 42.0],
            "patient_age": [*OVER_CAP_TEXT, "41", " 52 ", "63.5", "58 years", UNREADABLE],
            "sex": ["F", "M"] * 6,
        }
    )
    static.to_csv(tmp_path / "static.csv", index=False)
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        r = CliRunner().invoke(
            app,
            ["prepare", "--meds", str(tmp_path / "meds"), "--static", str(tmp_path / "static.csv"),
             "--out", str(out), "prepare.ehr.min_subjects=1", "prepare.split.val=0", "prepare.split.test=0"],
        )  # fmt: skip
    assert r.exit_code == 0, r.output[-2000:]
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    assert [f["name"] for f in manifest["ehr"]["static_numeric"]] == ["AgeAtIndex", "patient_age"]
    assert [f["name"] for f in manifest["ehr"]["static_categorical"]] == ["sex"]
    assert [(q["kind"], q["reason"], q["rows"]) for q in manifest["quarantine"]["items"]] == [
        ("static_values", "non_numeric_value", [11])
    ]
    stored = []
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as tf:
            stored += [
                decode_npz(tf.extractfile(m).read())["static_num"].tolist()
                for m in tf.getmembers()
                if m.name.endswith(".ehr.npz")
            ]
    ages = np.minimum(static["AgeAtIndex"].to_numpy(), CAP)
    text_ages = [CAP] * len(OVER_CAP_TEXT) + [41.0, 52.0, 63.5, 58.0]
    assert sorted(a for a, _ in stored) == sorted(ages.tolist())
    assert sorted(t for _, t in stored if not np.isnan(t)) == sorted(text_ages)
    # every subject is a training subject: the statistics are those of the capped ages, exactly
    stats = {f["name"]: f for f in manifest["ehr"]["static_numeric"]}
    for name, values in (("AgeAtIndex", ages), ("patient_age", np.array(text_ages))):
        assert stats[name]["mean"] == pytest.approx(values.mean(), abs=1e-4)
        assert stats[name]["std"] == pytest.approx(values.std(), abs=1e-4)
    # jepa-ray's own log lines: Ray's (a shared session's, at DEBUG) carry sizes and timings, one of
    # which read "104" once; Ray never sees a table's values
    logs = "\n".join(rec.getMessage() for rec in caplog.records if rec.name.startswith("jepa_ray"))
    for where, written in (("manifest", text), ("console", r.output), ("log", logs)):
        leaks = [written[max(m.start() - 80, 0) : m.end() + 40] for m in _OVER_CAP.finditer(written)]
        assert leaks == [] and UNREADABLE not in written, (where, leaks)


# --- the tables as files: nothing but a regular file is opened -------------------------------------


READERS = {
    "read_static": lambda p: ehr.read_static(p, ehr.EhrTables()),
    "read_outcomes": lambda p: ehr.read_outcomes(p, ehr.EhrTables()),
    "read_id_map": ehr.read_id_map,
}


def _special(tmp_path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(tmp_path / "table.parquet")
        return tmp_path / "table.parquet"
    if kind == "link to a fifo":
        os.mkfifo(tmp_path / "pipe.csv")
        (tmp_path / "table.csv").symlink_to(tmp_path / "pipe.csv")
        return tmp_path / "table.csv"
    if kind == "socket":
        path = tmp_path / "t.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()  # the socket file stays
        return path
    if kind == "device":
        return Path("/dev/zero")
    folder = tmp_path / "table.parquet"
    folder.mkdir()
    pd.DataFrame({"subject_id": [1], "age": [104.0]}).to_parquet(folder / "part.parquet")
    return folder


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo", "socket", "device", "folder"])
@pytest.mark.parametrize("reader", ["read_static", "read_outcomes", "read_id_map"])
def test_a_table_that_is_not_a_regular_file_is_refused_unopened(tmp_path, reader, kind):
    path = _special(tmp_path, kind)
    outcome: list[BaseException | object] = []

    def read():
        try:
            outcome.append(READERS[reader](path))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=read, daemon=True)  # a named pipe's open would block it forever
    t.start()
    t.join(10)
    assert not t.is_alive(), f"{reader} blocked on {kind} {path}"
    [error] = outcome
    assert isinstance(error, InvalidEhrError), error
    what = {"fifo": "a named pipe (FIFO)", "link to a fifo": "a named pipe (FIFO)", "socket": "a socket"}
    what |= {"device": "a character device", "folder": "a folder"}
    assert error.path == str(path) and error.reason == "not_regular_file"
    assert error.detail.startswith(f"{what[kind]}, not a regular file")
