"""Checkpoints that cannot run code and cannot be silently wrong.

Run storage (a shared volume, a bucket) is writable by more people than should be able to run code
in a training job. Two guarantees:

- **Nothing is unpickled.** jepa-ray's own state is tensors and text: the EMA target in
  safetensors, the step, data position and config in JSON. DeepSpeed's shards are pickles:
  `safe_loading()` makes every `torch.load` inside it (DeepSpeed's asks for `weights_only=False`)
  use PyTorch's restricted unpickler, which rebuilds tensors and containers only, plus the few
  DeepSpeed classes its optimizer states hold (`ALLOWED`). A crafted file fails to load; it never
  executes.
- **Every file is the one that was written.** Each rank records the sha256 and size of every file it
  wrote into its checkpoint (`digests-rank<r>.json`); `verify` checks them all before anything is
  loaded and names the first file that differs, is missing or was added. A resumed run falls back to
  the newest checkpoint that verifies (with a warning); `export` and `evaluate` refuse a bad one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from jepa_ray.errors import CheckpointError

log = logging.getLogger("jepa_ray.train")

DIGEST_PREFIX = "digests-rank"
_CHUNK = 1 << 20


def _allowed() -> list:
    """DeepSpeed classes its checkpoints pickle beside tensors (loss scalers, the ZeRO stage enum,
    ZeRO-1/2's flat-buffer fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def quietly() -> Iterator[None]:
    """DeepSpeed's checkpoint converters print each step and a progress bar: within the block
    stdout and stderr are dropped (jepa-ray reports what it wrote itself; errors still raise)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextmanager
def safe_loading() -> Iterator[None]:
    """Within the block every `torch.load` reads with `weights_only=True` and the DeepSpeed
    allowlist, whatever its caller asked for; anything else in a file raises instead of running."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(_allowed()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


@contextmanager
def private_copy(ckpt) -> Iterator[Path]:
    """A Ray Train checkpoint as a local directory that only this process reads: the directory
    itself on a local file system, else a fresh download removed on exit.

    Not `Checkpoint.as_directory()`: it downloads to a directory named by the checkpoint object's
    id, which every rank shares (the restored checkpoint is one pickled object), and a rank that
    takes the download lock after another rank's download has finished downloads again into the
    same files while that rank is reading them: it reads a truncated shard (an EOFError from
    torch.load). Each rank downloading its own copy costs one checkpoint's transfer per rank."""
    import pyarrow.fs as pafs

    if isinstance(ckpt.filesystem, pafs.LocalFileSystem):
        yield Path(ckpt.path)
        return
    local = Path(tempfile.mkdtemp(prefix="jepa-ray-checkpoint-"))
    try:
        ckpt.to_directory(str(local))
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_digests(directory: Path, rank: int, before: set[Path] | None = None) -> Path:
    """Record sha256 and size of the files this rank wrote under `directory` (every file not in
    `before`, the listing taken before it started writing)."""
    before = before or set()
    files = {
        str(p.relative_to(directory)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p not in before and not p.name.startswith(DIGEST_PREFIX)
    }
    out = directory / f"{DIGEST_PREFIX}{rank}.json"
    out.write_text(json.dumps(files, indent=1))
    return out


def verify(directory: Path) -> None:
    """CheckpointError naming the first file of `directory` that does not match what was written:
    a different sha256 or size, missing, or not written by any rank. A checkpoint written before
    digests existed (no digest file) is accepted with a warning."""
    digests = sorted(directory.glob(f"{DIGEST_PREFIX}*.json"))
    if not digests:
        log.warning("%s: no file digests (written by an older jepa-ray): not verified", directory)
        return
    expected: dict[str, dict] = {}
    for d in digests:
        try:
            expected.update(json.loads(d.read_text()))
        except ValueError as e:
            raise CheckpointError(f"{d}: unreadable digest file ({e})") from None
    for rel, want in sorted(expected.items()):
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing from the checkpoint (it was written at save time)")
        if p.stat().st_size != want["bytes"] or _sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p}: changed since it was written (sha256 differs): corrupt or tampered")
    extra = [
        p
        for p in sorted(directory.rglob("*"))
        if p.is_file()
        and not p.name.startswith(DIGEST_PREFIX)
        and str(p.relative_to(directory)) not in expected
    ]
    if extra:
        raise CheckpointError(f"{extra[0]}: not written by the run that saved this checkpoint")


def load_error(path: Path | str, e: Exception) -> CheckpointError:
    """The CheckpointError for a file the restricted unpickler (or the reader) refused."""
    if isinstance(e, CheckpointError):
        return e
    detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return CheckpointError(f"{path}: cannot be loaded as tensors only ({type(e).__name__}: {detail})")
