"""What `prepare` makes of an export tree as it comes from a hospital: file names that are not
UTF-8, named pipes and other entries that are not files, folders it cannot list, links to folders
and files (cycles included). Every DICOM file is read once or recorded with its reason, and the run
ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
from pathlib import Path

import pandas as pd
import pytest
from hostilekit import rle_image

from jepa_ray.config import load_config
from jepa_ray.errors import InvalidDicomError, PrepareError
from jepa_ray.ingest.deid import Pseudonymizer
from jepa_ray.ingest.header import read_header
from jepa_ray.ingest.listing import list_files, printable_path
from jepa_ray.ingest.prepare import prepare

SALT = os.environ["JEPA_RAY_SALT"].encode()
LATIN1 = os.fsdecode(b"M\xfcller.dcm")  # a Latin-1 name from a Windows export, as Python holds it
LATIN1_BAD = os.fsdecode(b"Fran\xe7ois.dcm")
LATIN1_MEDS = os.fsdecode(b"data/\xe9v\xe9nements.parquet")


def _cfg(*overrides: str):
    base = ["prepare.image.size=32", "prepare.files_per_task=4", "prepare.max_quarantine_fraction=0.9"]
    return load_config(overrides=[*base, *overrides]).prepare


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail, instead of hanging the suite, if the block takes longer than `seconds`."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _unlistable(folder: Path):
    """`folder` cannot be listed, as a folder without read permission is for anyone but root (these
    tests run as root, which any permission admits)."""
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", scandir)
        yield


def _export_tree(base: Path) -> Path:
    """An export with every kind of entry: 5 DICOM files to read (one under a name that is not
    UTF-8, one reached through a link to a folder outside the tree), one unreadable file under a
    name that is not UTF-8, a named pipe, a socket, a folder that cannot be listed (`locked`), a
    link cycle, a second path to a file, a dangling link."""
    root, outside = base / "dicom", base / "outside"
    for d in (root / "site", root / "locked", outside / "nested"):
        d.mkdir(parents=True)
    rle_image(root / "site" / "a.dcm", patient="P1")
    rle_image(root / "site" / "b.dcm", patient="P2")
    rle_image(root / LATIN1, patient="P3")
    rle_image(root / "locked" / "c.dcm", patient="P4")
    rle_image(outside / "nested" / "d.dcm", patient="P5")
    rle_image(outside / "e.dcm", patient="P6")
    (root / LATIN1_BAD).write_bytes(b"not a DICOM file at all" * 10)
    os.mkfifo(root / "site" / "pipe.dcm")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "socket"))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "site" / "again").symlink_to("..", target_is_directory=True)  # a cycle
    (root / "second.dcm").symlink_to(root / "site" / "a.dcm")
    (root / "dangling.dcm").symlink_to(root / "nowhere.dcm")
    return root


def _meds(base: Path) -> Path:
    """A MEDS root: one good file, one that is not parquet under a name that is not UTF-8."""
    data = base / "meds" / "data"
    data.mkdir(parents=True)
    pd.DataFrame(
        {
            "subject_id": ["P1", "P2", "P1"],
            "time": pd.to_datetime(["2019-01-01", "2019-02-01", "2019-03-01"]),
            "code": ["LAB//A", "LAB//A", "LAB//B"],
            "numeric_value": [1.0, 2.0, None],
        }
    ).to_parquet(data / "events.parquet")
    (base / "meds" / LATIN1_MEDS).write_bytes(b"PAR1 but cut")
    return base / "meds"


def _run(out: Path, root: Path, meds: Path, *overrides: str):
    with _unlistable(root / "locked"), _deadline(120):
        return prepare(str(out), _cfg(*overrides), dicom=str(root), meds=str(meds))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    return _export_tree(base), _meds(base)


@pytest.fixture(scope="module")
def hashed(ray_session, tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("hashed")
    return out, _run(out, *tree)


@pytest.fixture(scope="module")
def relative(ray_session, tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("relative")
    return out, _run(out, *tree, "prepare.deid.input_paths=relative")


# --- the listing -------------------------------------------------------------------------------


def test_the_listing_reads_every_file_once_and_names_every_entry_it_does_not_read(tmp_path):
    root = _export_tree(tmp_path)
    with _unlistable(root / "locked"):
        listing = list_files(root)
    rel = sorted(os.path.relpath(p, root) for p in listing.files)
    assert rel == sorted(
        [LATIN1, LATIN1_BAD, "site/a.dcm", "site/b.dcm", "linked/e.dcm", "linked/nested/d.dcm"]
    )
    unread = {os.path.relpath(u.path, root): u for u in listing.unread}
    assert {k: (u.what, u.reason) for k, u in unread.items()} == {
        "site/pipe.dcm": ("file", "not_regular_file"),
        "socket": ("file", "not_regular_file"),
        "locked": ("folder", "unreadable_folder"),
        "dangling.dcm": ("file", "unreadable_file"),
        "second.dcm": ("file", "read_before"),
        "site/again": ("folder", "read_before"),
    }
    assert "named pipe" in unread["site/pipe.dcm"].detail and "socket" in unread["socket"].detail
    assert "Permission denied" in unread["locked"].detail
    assert unread["second.dcm"].same_as == str(root / "site" / "a.dcm")
    assert unread["site/again"].same_as == str(root)
    assert not unread["second.dcm"].quarantined and unread["locked"].quarantined


def test_links_are_followed_whichever_comes_first_and_a_real_path_is_preferred(tmp_path):
    """A link met before the folder it points to: the folder is still read under its own path, and
    a loop of folder links (a -> b -> a) ends."""
    root = tmp_path / "root"
    (root / "z_real").mkdir(parents=True)
    (root / "z_real" / "x.dcm").write_bytes(b"x")
    (root / "a_link").symlink_to("z_real", target_is_directory=True)
    (root / "z_real" / "b_link").symlink_to("../c_link", target_is_directory=True)
    (root / "c_link").symlink_to("z_real", target_is_directory=True)
    listing = list_files(root)
    assert listing.files == [str(root / "z_real" / "x.dcm")]
    assert sorted((os.path.relpath(u.path, root), u.reason) for u in listing.unread) == [
        ("a_link", "read_before"),
        ("c_link", "read_before"),
        ("z_real/b_link", "read_before"),
    ]


def test_a_suffix_lists_only_matching_files_and_keeps_the_records(tmp_path):
    """The listing the MEDS side needs (`*.parquet` under data/, links followed, pipes recorded)."""
    root = tmp_path / "data"
    (root / "part").mkdir(parents=True)
    (root / "part" / "1.parquet").write_bytes(b"x")
    (root / "notes.txt").write_bytes(b"x")
    os.mkfifo(root / "2.parquet")
    os.mkfifo(root / "fifo.txt")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "3.parquet").write_bytes(b"x")
    (root / "more").symlink_to(tmp_path / "more", target_is_directory=True)
    listing = list_files(root, suffix=".parquet")
    assert [os.path.relpath(p, root) for p in listing.files] == ["part/1.parquet", "more/3.parquet"]
    assert [(os.path.relpath(u.path, root), u.reason) for u in listing.unread] == [
        ("2.parquet", "not_regular_file")
    ]


def test_a_named_pipe_or_a_device_is_refused_without_being_opened_for_reading(tmp_path):
    """The header read refuses what is not a regular file, also when handed one directly: a named
    pipe nobody writes to would block its open forever."""
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    errors: list[InvalidDicomError] = []

    def read(path):
        try:
            read_header(path)
        except InvalidDicomError as e:
            errors.append(e)

    for path in (fifo, Path("/dev/zero")):
        t = threading.Thread(target=read, args=(path,), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"reading {path} blocked"
    assert [(e.reason, e.detail.split(",")[0]) for e in errors] == [
        ("not_regular_file", "a named pipe (FIFO)"),
        ("not_regular_file", "a character device"),
    ]
    assert str(fifo) in str(errors[0])


def test_printable_path_escapes_bytes_that_are_not_utf8_and_nothing_else():
    assert printable_path(LATIN1) == "M\\xfcller.dcm"
    assert printable_path("Müller/ü.dcm") == "Müller/ü.dcm"  # UTF-8 names are written as they are
    assert printable_path(LATIN1).encode("utf-8")


# --- prepare over the tree ---------------------------------------------------------------------


def _samples(out: Path) -> int:
    return json.loads((out / "manifest.json").read_text())["counts"]["image"]


def test_prepare_reads_the_whole_tree_and_records_each_entry_it_does_not_read(hashed):
    _, result = hashed
    assert result.ok, result.problems
    m = result.manifest
    assert m["counts"]["image"] == 5  # a, b, the Latin-1 name, and both files behind the link
    pz = Pseudonymizer(SALT)
    quarantined = {q["input"]: (q["kind"], q["reason"]) for q in m["quarantine"]["items"]}
    expected = {
        "site/pipe.dcm": ("dicom", "not_regular_file"),
        "socket": ("dicom", "not_regular_file"),
        "dangling.dcm": ("dicom", "unreadable_file"),
        "locked": ("dicom_folder", "unreadable_folder"),
        LATIN1_BAD: ("dicom", "not_dicom"),
        LATIN1_MEDS: ("ehr_file", "unreadable_parquet"),
    }
    assert {pz.path(p): v for p, v in expected.items()} == {
        k: v for k, v in quarantined.items() if k.startswith("path-")
    }
    assert m["quarantine"]["by_reason"]["unreadable_folder"] == 1  # what the summary prints
    skipped = {s["input"]: s for s in m["skipped"]}
    for link, first in (("second.dcm", "site/a.dcm"), ("site/again", ".")):
        assert skipped[pz.path(link)]["reason"] == "read_before"
        assert skipped[pz.path(link)]["detail"].endswith(f"({pz.path(first)})")
    # the DICOM inputs: 6 files read (one of them not DICOM) and 3 entries that could not be
    assert m["inputs"]["dicom_files"] == 9
    assert m["quarantine"]["fractions"]["dicom"] == pytest.approx(4 / 9)
    assert m["counts"]["paired"] == 2  # P1 and P2 have EHR: the good MEDS file was read


def test_names_that_are_not_utf8_hash_as_their_bytes_and_a_rerun_keeps_every_shard(hashed, tree):
    out, result = hashed
    pz = Pseudonymizer(SALT)
    names = {q["input"] for q in result.manifest["quarantine"]["items"]}
    assert pz.path(LATIN1_BAD) in names and pz.path(LATIN1_BAD) != pz.path("François.dcm")
    again = _run(out, *tree)
    assert again.written == 0 and again.skipped == len(result.manifest["shards"])
    assert again.manifest["quarantine"] == result.manifest["quarantine"]


def test_relative_names_write_bytes_that_are_not_utf8_as_escapes(relative):
    out, result = relative
    assert result.ok, result.problems
    assert _samples(out) == 5
    m = result.manifest
    quarantined = {q["input"]: q["reason"] for q in m["quarantine"]["items"]}
    assert quarantined["Fran\\xe7ois.dcm"] == "not_dicom"
    assert quarantined["data/\\xe9v\\xe9nements.parquet"] == "unreadable_parquet"
    assert quarantined["locked"] == "unreadable_folder"
    assert quarantined["site/pipe.dcm"] == "not_regular_file"
    assert {s["input"]: s["detail"][-12:] for s in m["skipped"]}["second.dcm"] == "(site/a.dcm)"
    for path in [out / "manifest.json", *(out / "_parts").glob("*.json")]:
        text = path.read_bytes().decode("utf-8")  # valid UTF-8 throughout
        assert "\\udc" not in text, f"{path.name} holds a surrogate escape"


def test_an_unlistable_input_folder_is_an_error_naming_it(tmp_path):
    root = tmp_path / "dicom"
    root.mkdir()
    with _unlistable(root), pytest.raises(PrepareError, match=r"--dicom .*dicom: cannot list the folder"):
        prepare(str(tmp_path / "out"), _cfg(), dicom=str(root))
