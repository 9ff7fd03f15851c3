"""The files under an input folder: those `prepare` reads, and a record of every entry it does not.

A hospital export is walked as its users expect. Every regular file is listed, in the order of a
sorted top-down walk; hidden entries (a name starting with ".": an export's own bookkeeping, an
editor's or a file system's) are left out. Links are followed, to files and to folders, after the
tree itself has been walked, so that a file is named by its real path under the root when it has
one: a link's target is read under the link's path unless it has been read already (a folder of
the tree, or another link to it). Nothing is read twice, and a link to an enclosing folder (a
cycle) ends there. Every entry that is not read is reported (`Unread`), never dropped silently:

- `not_regular_file`: a named pipe, socket or device; never opened (reading a named pipe blocks
  until something writes to it, which may be never);
- `unreadable_file`: an entry whose type cannot be read, or a link that cannot be followed (its
  target is missing, or links loop);
- `unreadable_folder`: a folder that cannot be listed (permissions, an I/O error); what it holds
  is not known, so it is reported as one folder;
- `read_before` (not quarantined: skipped): a link to a file or folder already read under another
  path; its files are read once, under that path.

Identity is the real path (`os.path.realpath`), not the inode number, which some file systems
(overlay, network mounts) do not keep unique.

File names are bytes on POSIX; Python gives the bytes that are not UTF-8 as surrogate escapes
(`os.fsdecode`). `printable_path` is how such a name is written out as text.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass(frozen=True)
class Unread:
    """An entry under the root that is not read: its path as listed, whether it is a `file` or a
    `folder`, why (`reason`, `detail`), and, for one read under another path (`read_before`), that
    path (`same_as`). `quarantined` is False for an entry whose content is read all the same."""

    path: str
    what: str
    reason: str
    detail: str
    same_as: str | None = None

    @property
    def quarantined(self) -> bool:
        return self.reason != "read_before"


@dataclass
class Listing:
    """The regular files to read (paths under the root, through links where a link leads to them)
    and the entries not read."""

    files: list[str] = field(default_factory=list)
    unread: list[Unread] = field(default_factory=list)


def printable_path(path: str) -> str:
    """`path` as text that any UTF-8 writer accepts: a name that is not UTF-8 (a Latin-1 export's
    `M\\xfcller.dcm`, which Python holds with surrogate escapes) shows its bytes as `\\xNN`
    escapes; any other name is returned unchanged."""
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file name gives: escaped as itself
        return path.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def list_files(root: str | Path, suffix: str | None = None) -> Listing:
    """Every regular file under the folder `root` whose name ends with `suffix` (any name when
    None), and every entry not read (see the module docstring). An OSError listing `root` itself is
    raised: the caller names the input."""
    root = os.fspath(root)
    out = Listing()
    seen: dict[str, str] = {}  # real path of each folder and file read -> the path it was read under
    links: deque[str] = deque()
    with os.scandir(root):  # the root itself must be listable: raises otherwise
        pass
    _walk(root, os.path.realpath(root), suffix, out, seen, links)
    while links:  # links found while walking (also inside linked folders), in the order found
        _follow(links.popleft(), suffix, out, seen, links)
    return out


def _walk(
    top: str, top_real: str, suffix: str | None, out: Listing, seen: dict[str, str], links: deque[str]
) -> None:
    """A sorted top-down walk of `top` (whose real path is `top_real`) that does not follow links:
    they are queued in `links`."""
    stack = [(top, top_real)]
    while stack:
        path, real = stack.pop()
        if real in seen:  # reached again through a link into a folder already walked
            out.unread.append(_read_before(path, "folder", seen[real]))
            continue
        seen[real] = path
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            out.unread.append(
                Unread(
                    path,
                    "folder",
                    "unreadable_folder",
                    f"cannot list the folder ({_why(e)}): the files in it, if any, are not read",
                )
            )
            continue
        same = real == path  # inside the tree, not under a link: a path is its own real path
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_symlink():
                    links.append(entry.path)
                    continue
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append((entry.path, entry.path if same else os.path.join(real, entry.name)))
                    continue
                regular = entry.is_file(follow_symlinks=False)
                mode = 0 if regular else entry.stat(follow_symlinks=False).st_mode
            except OSError as e:
                out.unread.append(
                    Unread(entry.path, "file", "unreadable_file", f"cannot tell what it is ({_why(e)})")
                )
                continue
            if suffix is not None and not entry.name.endswith(suffix):
                continue
            if regular:
                _add_file(entry.path, entry.path if same else os.path.join(real, entry.name), out, seen)
            else:
                out.unread.append(_special(entry.path, mode))
        stack.extend(reversed(subdirs))


def _follow(link: str, suffix: str | None, out: Listing, seen: dict[str, str], links: deque[str]) -> None:
    """A link met during a walk: its folder walked, its file listed, or why not."""
    try:
        mode = os.stat(link).st_mode
        real = os.path.realpath(link)
    except OSError as e:
        if suffix is None or link.endswith(suffix):
            out.unread.append(
                Unread(link, "file", "unreadable_file", f"a link that cannot be followed ({_why(e)})")
            )
        return
    if stat.S_ISDIR(mode):
        _walk(link, real, suffix, out, seen, links)
    elif suffix is not None and not link.endswith(suffix):
        return
    elif stat.S_ISREG(mode):
        _add_file(link, real, out, seen)
    else:
        out.unread.append(_special(link, mode, through_link=True))


def _add_file(path: str, real: str, out: Listing, seen: dict[str, str]) -> None:
    if real in seen:
        out.unread.append(_read_before(path, "file", seen[real]))
    else:
        seen[real] = path
        out.files.append(path)


def _read_before(path: str, what: str, first: str) -> Unread:
    detail = (
        f"a link to a {what} already read under another path (a link cycle, or two paths to one "
        f"{what}): read once, under that path"
    )
    return Unread(path, what, "read_before", detail, same_as=first)


def entry_kind(mode: int) -> str:
    """What an entry that is neither a regular file nor a folder is, from its `st_mode`."""
    return next((name for test, name in _SPECIAL if test(mode)), "an entry of an unknown type")


def not_regular_file(path: str | Path) -> str | None:
    """What `path` (links followed) is when it exists and is not a regular file (a folder, a named
    pipe, a socket, a device), or None. Asked before opening: a named pipe's open waits for a writer."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing or unreachable: opening it fails at once, with the reader's own error
        return None
    if stat.S_ISREG(mode):
        return None
    return "a folder" if stat.S_ISDIR(mode) else entry_kind(mode)


def _special(path: str, mode: int, through_link: bool = False) -> Unread:
    via = "a link to " if through_link else ""
    return Unread(
        path, "file", "not_regular_file", f"{via}{entry_kind(mode)}, not a regular file: never opened"
    )


def _why(error: OSError) -> str:
    return error.strerror or type(error).__name__
