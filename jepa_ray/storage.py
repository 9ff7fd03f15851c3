"""Local directories and `s3://` prefixes behind one small interface (fsspec underneath).

Writes are atomic at the file level: a local file is written beside its target and renamed; an S3
object appears only when its upload completes. A reader therefore never sees half a shard.

S3 requests that the store refuses (5xx, throttling), drops or lets stall past `storage.timeout_s`
are retried `storage.retries` times with exponential backoff (botocore's standard retry mode);
an upload that still fails is a `ShardError` naming the object, which then does not exist. Ray
Train's checkpoint uploads go through the same filesystem (`pyarrow_filesystem`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec

from jepa_ray.config import StorageConfig
from jepa_ray.errors import ShardError


def is_remote(url: str) -> bool:
    """True for `s3://...` style URLs."""
    return "://" in url and not url.startswith("file://")


# s3fs's own loop around each request (on top of botocore's retries): a second try for the errors
# botocore does not retry (a truncated body, an unparsable response)
S3FS_RETRIES = 2


def make_filesystem(url: str, cfg: StorageConfig | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a URL; S3 endpoint/region/anon come from `cfg`."""
    cfg = cfg or StorageConfig()
    if url.startswith("s3://"):
        import s3fs

        client_kwargs = {}
        if cfg.endpoint_url:
            client_kwargs["endpoint_url"] = cfg.endpoint_url
        if cfg.region:
            client_kwargs["region_name"] = cfg.region
        retry = {
            "retries": {"max_attempts": cfg.retries, "mode": "standard"},  # retries, not attempts
            "connect_timeout": cfg.timeout_s,
            "read_timeout": cfg.timeout_s,
        }
        # No instance cache: listings must reflect objects written moments ago by other processes.
        fs = s3fs.S3FileSystem(
            anon=cfg.anon, client_kwargs=client_kwargs, config_kwargs=retry, skip_instance_cache=True
        )
        fs.retries = S3FS_RETRIES
        return fs
    if is_remote(url):
        protocol = url.split("://", 1)[0]
        raise ShardError(f"{url}: unsupported storage scheme {protocol!r}; use a local path or s3://")
    return fsspec.filesystem("file")


def pyarrow_filesystem(url: str, cfg: StorageConfig | None = None):
    """A pyarrow filesystem for Ray Data readers (s3fs wrapped through FSSpecHandler)."""
    import pyarrow.fs as pafs

    if url.startswith("s3://"):
        return pafs.PyFileSystem(pafs.FSSpecHandler(make_filesystem(url, cfg)))
    return pafs.LocalFileSystem()


@dataclass
class Store:
    """A root URL (local dir or s3 prefix) and the filesystem that reaches it."""

    url: str
    cfg: StorageConfig

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.fs = make_filesystem(self.url, self.cfg)
        if self.url.startswith("s3://"):
            self.root = self.url[len("s3://") :]
        else:
            self.root = str(Path(self.url.removeprefix("file://")).resolve())

    def path(self, name: str) -> str:
        """Filesystem path of `name` under the root."""
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        """Full URL of `name` (what users and Ray Data see)."""
        return f"s3://{self.path(name)}" if self.url.startswith("s3://") else self.path(name)

    def makedirs(self, name: str = "") -> None:
        """Create a directory (a no-op on object stores)."""
        if not is_remote(self.url):
            os.makedirs(self.path(name) if name else self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        """Whether `name` exists under the root."""
        return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        """Whole content of `name`."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError as e:
            raise ShardError(f"{self.uri(name)}: not found") from e

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write `name` atomically."""
        if is_remote(self.url):
            with self._uploading(name):
                self.fs.pipe_file(self.path(name), data)
            return
        fd, tmp = self.staging_file(name)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.put_file(tmp, name)

    def staging_file(self, name: str) -> tuple[int, str]:
        """An open (fd, path) to write `name` into before `put_file`: beside the target for a local
        store (so the final rename stays on one filesystem and is atomic), in the temp dir for S3."""
        if is_remote(self.url):
            return tempfile.mkstemp(prefix=f"jepa-ray-{Path(name).name}.", suffix=".tmp")
        target = Path(self.path(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")

    def put_file(self, local_path: str, name: str) -> None:
        """Move/upload a finished local file to `name` atomically."""
        if is_remote(self.url):
            try:
                with self._uploading(name):
                    self.fs.put_file(local_path, self.path(name))
            finally:
                os.remove(local_path)
            return
        target = Path(self.path(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, target)

    @contextlib.contextmanager
    def _uploading(self, name: str):
        """An upload that failed (after its retries, where S3 allows one): a ShardError naming the object (S3 makes an
        object visible only when its upload completes, so none is left behind)."""
        try:
            yield
        except (OSError, ValueError) as e:  # s3fs's translation of S3 and connection errors
            raise ShardError(
                f"{self.uri(name)}: upload failed ({e}); refused, dropped and stalled requests were "
                f"retried up to {self.cfg.retries} times (storage.retries, storage.timeout_s="
                f"{self.cfg.timeout_s:g})"
            ) from e

    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to the root) of the files directly under `prefix`."""
        base = self.path(prefix) if prefix else self.root
        try:
            entries = self.fs.ls(base, detail=True, refresh=True) if is_remote(self.url) else None
        except FileNotFoundError:
            return []
        if entries is None:
            if not os.path.isdir(base):
                return []
            return sorted(
                f"{prefix}/{n}" if prefix else n
                for n in os.listdir(base)
                if os.path.isfile(os.path.join(base, n))
            )
        names = []
        for e in entries:
            if e.get("type") == "file":
                rel = e["name"][len(self.root) + 1 :]
                names.append(rel)
        return sorted(names)

    def sha256(self, name: str) -> str:
        """Hex sha256 of `name`'s content, read in blocks."""
        h = hashlib.sha256()
        with self.open(name) as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    def remove(self, name: str) -> None:
        """Delete `name` if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def open(self, name: str, mode: str = "rb"):
        """An open file object for `name`."""
        return self.fs.open(self.path(name), mode)
