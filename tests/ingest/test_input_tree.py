"""What `prepare` makes of an export tree as it comes from a hospital: file names that are not
UTF-8, named pipes and other entries that are not files, folders it cannot list, links to folders
and files (cycles included). Every DICOM file, MEDS file and mask is read once or recorded with its
reason, no named pipe is opened, and the run ends."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hostilekit import rle_image
from PIL import Image

from jepa_ray.config import load_config
from jepa_ray.errors import InvalidDicomError, InvalidEhrError, PrepareError
from jepa_ray.ingest import ehr
from jepa_ray.ingest.deid import Pseudonymizer
from jepa_ray.ingest.header import read_header
from jepa_ray.ingest.listing import list_files, printable_path
from jepa_ray.ingest.masks import allowed_names, mask_stats, read_masks
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
def _unlistable(*folders: Path):
    """`folders` cannot be listed, as a folder without read permission is for anyone but root (these
    tests run as root, which any permission admits). In this process only: not in Ray's workers."""
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) in {str(f) for f in folders}:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", scandir)
        yield


@contextlib.contextmanager
def _no_pipe_opened(*fifos: Path):
    """Fail, instead of hanging, if anything (this process or a Ray worker) opens one of `fifos` for
    reading: a watcher opens each for writing without blocking, which succeeds only while a reader
    has it open, and closes it again, so that the reader sees an empty file and the run goes on."""
    opened: set[str] = set()
    stop = threading.Event()

    def watch():
        while not stop.wait(0.05):
            for fifo in fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: nobody is reading it
                    continue
                os.close(fd)
                opened.add(str(fifo))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    assert not opened, f"opened for reading: {sorted(opened)}"


def _png(path: Path, size: int = 64) -> None:
    Image.fromarray(np.full((size, size), 255, np.uint8)).save(path)


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


def _events(subjects: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": subjects,
            "time": pd.to_datetime(["2019-01-01", "2019-02-01", "2019-03-01"][: len(subjects)]),
            "code": ["LAB//A", "LAB//A", "LAB//B"][: len(subjects)],
            "numeric_value": [1.0, 2.0, None][: len(subjects)],
        }
    )


def _meds(base: Path) -> Path:
    """A MEDS root: one good file, one that is not parquet under a name that is not UTF-8, a named
    pipe, a folder that cannot be listed (`data/locked`), a link to a folder outside the root (P5's
    events), a second path to the good file, a dangling link."""
    data, outside = base / "meds" / "data", base / "meds_outside"
    for d in (data / "locked", outside):
        d.mkdir(parents=True)
    _events(["P1", "P2", "P1"]).to_parquet(data / "events.parquet")
    _events(["P4"]).to_parquet(data / "locked" / "hidden.parquet")
    _events(["P5", "P5"]).to_parquet(outside / "p5.parquet")
    (base / "meds" / LATIN1_MEDS).write_bytes(b"PAR1 but cut")
    os.mkfifo(data / "pipe.parquet")
    (data / "linked").symlink_to(outside, target_is_directory=True)
    (data / "again.parquet").symlink_to("events.parquet")
    (data / "gone.parquet").symlink_to(data / "nowhere.parquet")
    return base / "meds"


def _masks(base: Path, root: Path) -> Path:
    """Structure masks for the export: site/a's lung is a named pipe, site/b's lung a second name for
    its heart, linked/e's folder is reached through a link, linked/nested/d's heart is a dangling
    link; the Latin-1 image has none."""
    masks, outside = base / "masks", base / "masks_outside"
    for d in (masks / "site" / "a", masks / "site" / "b", outside / "e", outside / "nested" / "d"):
        d.mkdir(parents=True)
    for folder in (masks / "site" / "a", masks / "site" / "b", outside / "e"):
        _png(folder / "heart.png")
    os.mkfifo(masks / "site" / "a" / "lung.png")
    (masks / "site" / "b" / "lung.png").symlink_to("heart.png")
    (outside / "nested" / "d" / "heart.png").symlink_to(outside / "nowhere.png")
    (masks / "linked").symlink_to(outside, target_is_directory=True)
    return masks


def _fifos(*roots: Path) -> list[Path]:
    return [p for r in roots for p in r.rglob("*") if p.is_fifo()]


def _run(out: Path, root: Path, meds: Path, masks: Path, *overrides: str):
    locked = (root / "locked", meds / "data" / "locked")
    with _unlistable(*locked), _no_pipe_opened(*_fifos(root, meds, masks)), _deadline(120):
        return prepare(str(out), _cfg(*overrides), dicom=str(root), meds=str(meds), masks=str(masks))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    root = _export_tree(base)
    return root, _meds(base), _masks(base, root)


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


# --- the MEDS folder, the masks folder, single input files ------------------------------------


def test_meds_files_keep_the_order_of_a_sorted_rglob_for_an_ordinary_tree(tmp_path):
    """Rows that tie keep their file's order, so the order of the files must not change: a folder's
    files and its subfolders' interleave by path, as `sorted(rglob)` gave them."""
    data = tmp_path / "meds" / "data"
    for rel in ("b.parquet", "a/x.parquet", "a.parquet", "a/b/y.parquet", "c/z.parquet", "a_/w.parquet"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"x")
    listing = ehr.meds_files(tmp_path / "meds")
    assert listing.files == [str(p) for p in sorted(data.rglob("*.parquet"))]
    assert listing.files != list_files(data, suffix=".parquet").files  # not the walk's order
    assert listing.unread == []


def test_the_meds_folder_is_listed_like_the_dicom_tree(tmp_path):
    """A named pipe among the MEDS files is recorded, never opened; a linked folder is read; a
    folder that cannot be listed, a dangling link and a second path to a file are each recorded."""
    meds = _meds(tmp_path)
    with _unlistable(meds / "data" / "locked"), _no_pipe_opened(*_fifos(meds)), _deadline(60):
        tables = ehr.read_meds(meds)
    assert sorted((q.input, q.kind, q.reason) for q in tables.quarantine) == [
        ("data/gone.parquet", "ehr_file", "unreadable_file"),
        ("data/locked", "ehr_folder", "unreadable_folder"),
        ("data/pipe.parquet", "ehr_file", "not_regular_file"),
        (LATIN1_MEDS, "ehr_file", "unreadable_parquet"),
    ]
    detail = {q.input: q.detail for q in tables.quarantine}
    assert "named pipe" in detail["data/pipe.parquet"]
    assert "Permission denied" in detail["data/locked"]
    assert [(u.path, u.reason, u.same_as) for u in tables.skipped] == [
        ("data/again.parquet", "read_before", "data/events.parquet")
    ]
    assert tables.event_files == 2 and tables.event_rows == 5  # events.parquet once, linked/p5.parquet
    assert set(tables.events) == {"P1", "P2", "P5"}


def test_a_meds_folder_that_cannot_be_listed_is_an_error_naming_it(tmp_path):
    data = tmp_path / "meds" / "data"
    data.mkdir(parents=True)
    with _unlistable(data), pytest.raises(InvalidEhrError, match=r"meds/data: unreadable_folder"):
        ehr.read_meds(tmp_path / "meds")


@pytest.mark.parametrize("label", ["meds", "static", "outcomes", "masks", "id_map"])
def test_a_named_pipe_given_as_an_input_is_refused_unopened(tmp_path, label):
    """Opening a named pipe for reading waits for a writer: an input file that is one (or a link to
    one) is an error naming it, before anything is read."""
    fifo = tmp_path / f"{label}.parquet"
    os.mkfifo(fifo)
    link = tmp_path / f"{label}-link.parquet"
    link.symlink_to(fifo)
    (tmp_path / "dicom").mkdir()
    flag = "prepare.ehr.id_map" if label == "id_map" else f"--{label}"
    for given in (fifo, link):
        inputs = {"dicom": str(tmp_path / "dicom")} | ({} if label == "id_map" else {label: str(given)})
        cfg = _cfg(f"prepare.ehr.id_map={given}") if label == "id_map" else _cfg()
        with (
            _no_pipe_opened(fifo),
            _deadline(30),
            pytest.raises(
                PrepareError, match=re.escape(f"{flag} {given}: a named pipe (FIFO), not a file or folder")
            ),
        ):
            prepare(str(tmp_path / "out"), cfg, **inputs)
    if label == "meds":
        with _no_pipe_opened(fifo), _deadline(30), pytest.raises(InvalidEhrError, match="not_regular_file"):
            ehr.read_meds(fifo)


def test_a_mask_folder_is_listed_like_the_dicom_tree(tmp_path):
    """A structure that is a named pipe or a dangling link, or a mask folder that cannot be listed,
    leaves the image's masks out with the listing's reason, nothing opened; a linked folder and a
    second name for a PNG are read; an entry that is no structure's is left out unopened."""
    good, piped, dangling, locked = (tmp_path / n for n in ("good", "piped", "dangling", "locked"))
    for folder in (good, piped, dangling, locked, tmp_path / "elsewhere"):
        folder.mkdir()
        _png(folder / "heart.png", 8)
    (good / "lung.png").symlink_to("heart.png")  # a second name: a second structure
    os.mkfifo(good / "Not A Structure.png")
    (good / "gone.txt").symlink_to(tmp_path / "nowhere")
    (good / "frame-1").mkdir()  # a multi-frame file's frames: not this folder's structures
    os.mkfifo(good / "frame-1" / "heart.png")
    os.mkfifo(piped / "lung.png")
    (dangling / "lung.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    def masks(folder: Path):
        return read_masks(str(folder), (8, 8), [0, 0, 8, 8], 8, 10**6)

    with _unlistable(locked), _no_pipe_opened(*_fifos(tmp_path)), _deadline(60):
        planes, names = masks(good)
        assert names == ["heart", "lung"] and planes.shape == (2, 8, 8) and planes.all()
        assert masks(tmp_path / "linked")[1] == ["heart"]
        for folder, reason, said in (
            (piped, "not_regular_file", "lung.png: a named pipe"),
            (dangling, "unreadable_file", "lung.png: a link that cannot be followed"),
            (locked, "unreadable_folder", "cannot list the mask folder (Permission denied)"),
        ):
            with pytest.raises(InvalidDicomError) as e:
                masks(folder)
            assert (e.value.reason, e.value.path) == (reason, str(folder)) and said in e.value.detail
        # what decides a shard's rewrite: listed, never opened, never raising
        stats = {f.name: mask_stats(str(f)) for f in (good, piped, dangling, locked)}
    assert stats["piped"].endswith("lung.png|not_regular_file")
    assert stats["dangling"].endswith("lung.png|unreadable_file")
    assert stats["locked"] == "unreadable_folder"
    assert "frame-1/heart.png|not_regular_file" in stats["good"]


def test_a_legend_that_is_not_a_regular_file_admits_no_structure_unopened(tmp_path):
    os.mkfifo(tmp_path / "structures.json")
    with _no_pipe_opened(tmp_path / "structures.json"), _deadline(30):
        assert allowed_names(tmp_path) == set()
    assert allowed_names(tmp_path / "elsewhere") is None  # no legend: any well-formed name


# --- prepare over the tree ---------------------------------------------------------------------


def _samples(out: Path) -> int:
    return json.loads((out / "manifest.json").read_text())["counts"]["image"]


def _mask_names(out: Path) -> dict[str, list[str]]:
    """{subject pseudonym: its sample's mask names} of the samples that have masks."""
    names = {}
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(member).read())
                    if isinstance(meta, dict) and meta.get("masks"):
                        names[meta["subject"]] = meta["masks"]
    return names


def test_prepare_reads_the_whole_tree_and_records_each_entry_it_does_not_read(hashed):
    out, result = hashed
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
        "data/pipe.parquet": ("ehr_file", "not_regular_file"),
        "data/gone.parquet": ("ehr_file", "unreadable_file"),
        "data/locked": ("ehr_folder", "unreadable_folder"),
    }
    masks = {  # an image's masks that cannot be used: the image is kept
        "site/a.dcm": ("mask", "not_regular_file"),
        "linked/nested/d.dcm": ("mask", "unreadable_file"),
    }
    assert {pz.path(p): v for p, v in expected.items()} | {
        f"{pz.path(p)} (masks)": v for p, v in masks.items()
    } == {k: v for k, v in quarantined.items() if k.startswith("path-")}
    assert m["quarantine"]["by_reason"]["unreadable_folder"] == 2  # what the summary prints
    skipped = {s["input"]: s for s in m["skipped"]}
    for link, first in (
        ("second.dcm", "site/a.dcm"),
        ("site/again", "."),
        ("data/again.parquet", "data/events.parquet"),
    ):
        assert skipped[pz.path(link)]["reason"] == "read_before"
        assert skipped[pz.path(link)]["detail"].endswith(f"({pz.path(first)})")
    # the DICOM inputs: 6 files read (one of them not DICOM) and 3 entries that could not be
    assert m["inputs"]["dicom_files"] == 9
    assert m["quarantine"]["fractions"]["dicom"] == pytest.approx(4 / 9)
    # P1 and P2 (the good MEDS file, read once), P5 (the MEDS folder linked in) have EHR
    assert m["counts"]["paired"] == 3
    assert m["ehr"]["event_files"] == 2 and m["ehr"]["event_rows"] == 5
    # b's masks (heart, and lung: a second name for it) and e's (a linked mask folder) are kept
    assert sum(split.get("masks", 0) for split in m["splits"].values()) == 2
    assert _mask_names(out) == {pz.subject("P2"): ["heart", "lung"], pz.subject("P6"): ["heart"]}


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
    assert quarantined["data/pipe.parquet"] == "not_regular_file"
    assert quarantined["data/locked"] == "unreadable_folder"
    skipped = {s["input"]: s["detail"] for s in m["skipped"]}
    assert skipped["second.dcm"].endswith("(site/a.dcm)")
    assert skipped["data/again.parquet"].endswith("(data/events.parquet)")
    for path in [out / "manifest.json", *(out / "_parts").glob("*.json")]:
        text = path.read_bytes().decode("utf-8")  # valid UTF-8 throughout
        assert "\\udc" not in text, f"{path.name} holds a surrogate escape"


def test_an_unlistable_input_folder_is_an_error_naming_it(tmp_path):
    root = tmp_path / "dicom"
    root.mkdir()
    with _unlistable(root), pytest.raises(PrepareError, match=r"--dicom .*dicom: cannot list the folder"):
        prepare(str(tmp_path / "out"), _cfg(), dicom=str(root))
