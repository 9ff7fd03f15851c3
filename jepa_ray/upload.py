"""What a jepa-ray job uploads from a checkout: an allowlist of its files, never a secret.

`plan_upload` picks the files a job needs (the `jepa_ray/` and `jobs/` sources and configs,
`pyproject.toml`, `constraints.txt`, `README.md`, the `--config` files the command names) and
refuses an upload that is not a checkout, names a config outside it or like a secret, or is too
large; secret-looking files are left out even from those folders. `staged` copies exactly those
files into a temporary folder, which is what the job's `working_dir` points at: a checkout is
never uploaded as it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from jepa_ray.errors import JobError

# What a job needs from a checkout; nothing else in it is uploaded. README.md: pyproject's readme,
# so that `pip install .` works in the uploaded folder.
UPLOAD_DIRS = ("jepa_ray", "jobs")
UPLOAD_FILES = ("pyproject.toml", "constraints.txt", "README.md")
UPLOAD_SUFFIXES = (".py", ".yaml", ".yml")
MAX_UPLOAD_BYTES = 100 * 2**20  # a checkout's sources are ~1 MiB; Ray itself refuses 500 MiB
_CACHE_DIR = re.compile(r"__pycache__|.*\.egg-info|\.(pytest|ruff|mypy)_cache")
# file or folder names that hold credentials, keys or the de-identification salt
_SECRET_NAME = re.compile(
    r"^\.env|\.env$|^[._]?netrc$|^\.pgpass$|^id_(rsa|dsa|ecdsa|ed25519)|^auth_token|\.token$"
    r"|\.(pem|key|p12|pfx|jks|keystore|gpg)$|credential|secret|salt|passw(or)?d"
    r"|^\.(aws|ssh|gnupg|kube|docker|azure|gcloud)$",
    re.IGNORECASE,
)


def checkout_root() -> Path | None:
    """The jepa-ray checkout this package runs from (it holds jobs/ and pyproject.toml), if any."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "jobs" / "pretrain.py").is_file() and (root / "pyproject.toml").is_file() else None


def config_paths(args: Sequence[str]) -> list[str]:
    """The --config / -c / --config= values in a command's arguments, in order."""
    out = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


@dataclass(frozen=True)
class Upload:
    """What a job's working_dir holds: files of the checkout `root` (relative path -> size in bytes),
    and the files under the uploaded folders that were left out."""

    root: Path
    files: dict[str, int]
    secrets: tuple[str, ...] = ()  # secret-looking: never uploaded, named in a warning
    left_out: tuple[str, ...] = ()  # neither Python nor YAML, hidden, or a link

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self) -> str:
        """One line: how many files, how large, and the top-level entries."""
        tops: dict[str, int] = {}
        for rel in self.files:
            top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
            tops[top] = tops.get(top, 0) + 1
        entries = ", ".join(
            f"{t} ({n} file{'s' * (n != 1)})" if t.endswith("/") else t for t, n in sorted(tops.items())
        )
        return (
            f"uploading {len(self.files)} files ({_size(self.total_bytes)}) from {self.root} as the "
            f"job's working_dir: {entries}"
        )

    def warnings(self) -> list[str]:
        out = []
        if self.secrets:
            out.append(
                f"left out {len(self.secrets)} secret-looking file(s), never uploaded: "
                f"{', '.join(self.secrets)} (keep credentials, keys and salts out of the checkout)"
            )
        if self.left_out:
            shown = ", ".join(self.left_out[:10]) + (", ..." if len(self.left_out) > 10 else "")
            out.append(
                f"left out {len(self.left_out)} other file(s) (only Python and YAML sources are uploaded, "
                f"never links or hidden files): {shown}"
            )
        return out


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def is_secret_name(rel: str) -> bool:
    """Whether a relative path has a part named like a credential, key, .env or salt file."""
    return any(_SECRET_NAME.search(part) for part in Path(rel).parts)


def _walk(root: Path, top: str, suffixes: tuple[str, ...], recursive: bool = True):
    """(relative path, kind) of every file under root/top: kind is 'file', 'secret' or 'left out'."""
    base = root / top
    if not base.is_dir() or base.is_symlink():
        return
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if recursive and not _CACHE_DIR.fullmatch(d))
        for name in sorted(filenames) + [d for d in dirnames if (here / d).is_symlink()]:
            rel = (here / name).relative_to(root).as_posix()
            if is_secret_name(rel):
                yield rel, "secret"
            elif name.endswith(".pyc"):
                continue
            elif (
                (here / name).is_symlink()
                or any(part.startswith(".") for part in Path(rel).parts)
                or not (name.endswith(suffixes) or name == "py.typed")
            ):
                yield rel, "left out"
            else:
                yield rel, "file"
        if not recursive:
            break


def resolve_checkout(working_dir: Path) -> Path:
    """`working_dir` as an absolute path; JobError when it is not a jepa-ray checkout."""
    root = Path(working_dir).expanduser().resolve()
    if not (root / "jobs" / "pretrain.py").is_file():
        raise JobError(
            f"--working-dir {root}: not a jepa-ray checkout (no jobs/pretrain.py); pass the checkout's "
            "root, or --installed to run the jepa-ray installed on the cluster"
        )
    return root


def plan_upload(checkout: Path, command: str, args: Sequence[str]) -> Upload:
    """The files of a checkout a job needs: the jepa_ray/ and jobs/ sources and configs (benchmarks/
    for `bench`), pyproject.toml, constraints.txt, README.md, and the `--config` files in `args`;
    never secret-looking ones. JobError when it is not a checkout, a config lies outside it or looks
    like a secret, or the upload is larger than MAX_UPLOAD_BYTES."""
    root = resolve_checkout(checkout)
    found: list[tuple[str, str]] = []
    for top in UPLOAD_DIRS:
        found += _walk(root, top, UPLOAD_SUFFIXES)
    if command == "bench":
        found += _walk(root, "benchmarks", (".py",), recursive=False)
    found += [
        (name, "file") for name in UPLOAD_FILES if (root / name).is_file() and not (root / name).is_symlink()
    ]
    for cfg in config_paths(args):
        found.append((config_in_checkout(root, cfg), "file"))
    files = {rel: (root / rel).stat().st_size for rel, kind in found if kind == "file"}
    upload = Upload(
        root=root,
        files=dict(sorted(files.items())),
        secrets=tuple(sorted({rel for rel, kind in found if kind == "secret"})),
        left_out=tuple(sorted({rel for rel, kind in found if kind == "left out"} - set(files))),
    )
    if upload.total_bytes > MAX_UPLOAD_BYTES:
        largest = sorted(files.items(), key=lambda kv: -kv[1])[:5]
        raise JobError(
            f"--working-dir {root}: the upload would be {_size(upload.total_bytes)}, over jepa-ray's limit "
            f"of {_size(MAX_UPLOAD_BYTES)} (Ray refuses 500 MiB); the largest files: "
            + ", ".join(f"{rel} ({_size(n)})" for rel, n in largest)
            + ". Keep data out of jepa_ray/ and jobs/ (shards and runs belong on storage the cluster "
            "reads), or submit with --installed or --image"
        )
    return upload


def config_in_checkout(root: Path, cfg: str) -> str:
    """A --config path as the job will open it, relative to the uploaded folder."""
    rel = os.path.normpath(cfg)
    if (
        Path(rel).is_absolute()
        or rel.split(os.sep, 1)[0] == ".."
        or not (root / rel).resolve().is_relative_to(root)
    ):
        raise JobError(
            f"--config {cfg}: outside the checkout {root}; only files inside it are uploaded, so move "
            "the config into it (jobs/configs/)"
        )
    if is_secret_name(rel):
        raise JobError(
            f"--config {cfg}: its name looks like a credential, key or salt file, which jepa-ray never "
            "uploads; rename the config (and keep secrets out of configs: a salt stays in a file on the "
            "cluster, prepare.deid.salt_file)"
        )
    if not (root / rel).is_file():
        raise JobError(
            f"--config {cfg}: no such file in the working directory {root}; the job would not find it"
        )
    return Path(rel).as_posix()


@contextlib.contextmanager
def staged(upload: Upload | None) -> Iterator[Path | None]:
    """A temporary folder (mode 0700) holding a copy of exactly the upload's files; removed on exit."""
    if upload is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="jepa-ray-upload-") as tmp:
        for rel in upload.files:
            dest = Path(tmp, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not (upload.root / rel).resolve().is_relative_to(upload.root):  # became a link since
                raise JobError(f"{upload.root / rel}: now leads outside the checkout; not uploaded")
            try:
                shutil.copyfile(upload.root / rel, dest)
            except OSError as e:
                raise JobError(
                    f"{upload.root / rel}: cannot copy it into the upload: {e.strerror or e}"
                ) from None
        yield Path(tmp)
