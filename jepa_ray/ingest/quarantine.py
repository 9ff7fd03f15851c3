"""Quarantine records of DICOM inputs, in the one shape the manifest and the shards' sidecars hold:
`{"input", "kind": "dicom", "reason", "detail"}` (a CT series' record adds `"count"`).

Two reasons come from failures no check foresaw, and keep the error's type only, never its message
(which could quote header text): `unexpected_error` (an exception while reading an input; the rest
of the run goes on) and `worker_crashed` (reading the input ended its worker process, also when it
was read alone). The reasons of a file that is not a usable DICOM are listed in
`jepa_ray.ingest.header`; those of an entry under `--dicom` that is not read at all (a named pipe,
a link that leads nowhere, a folder that cannot be listed: kind `dicom_folder`) in
`jepa_ray.ingest.listing`.
"""

from __future__ import annotations

from typing import Any


def dicom_record(source: str, reason: str, detail: str) -> dict[str, Any]:
    """The quarantine record of a DICOM input: `source` is its name as written (inside a header
    scan, its path, named by `prepare` afterwards)."""
    return {"input": source, "kind": "dicom", "reason": reason, "detail": detail}


def unexpected_error(source: str, error: BaseException, what: str) -> dict[str, Any]:
    """The record of an input whose reading raised an error no check foresaw (`what`: "this
    file", "the header", ...)."""
    detail = f"{type(error).__name__} while reading {what}; the rest of the run goes on"
    return dicom_record(source, "unexpected_error", detail)


def worker_crashed(source: str, error: BaseException, step: str, alone: str) -> dict[str, Any]:
    """The record of an input whose task ended its worker process, also when run on its own
    (`step`: "reading its header", ...; `alone`: "read", "decoded")."""
    detail = f"{step} ended the worker process ({error_type(error)}), also when {alone} alone"
    return dicom_record(source, "worker_crashed", detail)


def error_type(error: BaseException) -> str:
    """The type of what stopped a task (Ray wraps it): never the message, which can quote input."""
    inner = getattr(error, "cause", None)
    return type(inner if isinstance(inner, BaseException) else error).__name__
