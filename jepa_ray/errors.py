"""Exception types of jepa-ray: each message names the input and what to do about it."""

from __future__ import annotations


class JepaRayError(Exception):
    """Base class of every error jepa-ray raises on purpose."""


class ConfigError(JepaRayError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class InvalidInputError(JepaRayError):
    """An input file cannot be used; `reason` is a short machine-readable category."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")


class InvalidDicomError(InvalidInputError):
    """A DICOM input cannot be used."""


class InvalidEhrError(InvalidInputError):
    """An EHR input (MEDS parquet, static or outcome table) cannot be used."""


class PrepareError(JepaRayError):
    """`prepare` cannot produce a usable shard set (nothing usable, too much quarantined, ...)."""


class ShardError(JepaRayError):
    """A shard set or manifest is missing, inconsistent or corrupt."""


class CheckpointError(JepaRayError):
    """A checkpoint file is corrupt, was changed after it was written, or holds more than tensors."""


class JobError(JepaRayError):
    """A job could not be submitted, uploaded, found or followed; the message names the input, the
    address or the job."""
