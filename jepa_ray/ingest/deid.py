"""De-identification: salted HMAC pseudonyms for subjects, studies and sites.

The salt keys every pseudonym and is never written anywhere; only a one-way fingerprint of it
goes into the manifest, so that a rerun with another salt is detected instead of mixing ids. The
fingerprint is a slow KDF (scrypt) of the salt, so that someone holding a manifest cannot test
guesses of a salt quickly; a salt of 32 random bytes (`jepa-ray salt new FILE`) cannot be guessed
at any speed, and shorter ones are refused (`jepa_ray.config.MIN_SALT_CHARS`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

# scrypt cost of the fingerprint: ~16 MiB and a few tens of ms per guess
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 2**20, "dklen": 16}


def new_salt() -> str:
    """32 random bytes, hex-encoded (64 characters)."""
    return secrets.token_hex(32)


def write_salt(path: str | Path) -> Path:
    """A new random salt in a new file readable by its owner only (0600); never overwrites."""
    path = Path(path).expanduser()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_salt() + "\n")
    return path


@dataclass(frozen=True)
class Pseudonymizer:
    """Maps raw identifiers to stable pseudonyms: HMAC-SHA256(salt, kind + value)."""

    salt: bytes = field(repr=False)

    def _digest(self, kind: str, value: str) -> str:
        # UTF-8; a file name that is not UTF-8 (held by Python with surrogate escapes, as
        # `os.fsdecode` gives it) hashes as its own bytes, so distinct names stay distinct
        text = f"{kind}\x1f{value}".encode("utf-8", "surrogateescape")
        return hmac.new(self.salt, text, hashlib.sha256).hexdigest()

    def subject(self, subject_id: str | int) -> str:
        """Pseudonym of a subject (MEDS subject_id, or DICOM PatientID when it has no EHR)."""
        return "p" + self._digest("subject", str(subject_id))[:20]

    def study(self, subject_id: str | int, study_key: str) -> str:
        """Pseudonym of one imaging study of a subject."""
        return "s" + self._digest("study", f"{subject_id}\x1f{study_key}")[:20]

    def site(self, institution: str | None) -> str:
        """Pseudonym of an acquisition site (from InstitutionName); `unknown` when absent."""
        if not institution or not institution.strip():
            return "site-unknown"
        return "site-" + self._digest("site", institution.strip().casefold())[:8]

    def path(self, relative_path: str) -> str:
        """Pseudonym of an input path, for manifests whose paths may carry identifiers; a path that
        is not UTF-8 is hashed as its bytes (see `_digest`)."""
        return "path-" + self._digest("path", relative_path)[:16]

    def unit(self, subject_pseudonym: str) -> float:
        """A uniform number in [0, 1) per subject, for deterministic split assignment."""
        return int(self._digest("split", subject_pseudonym)[:13], 16) / 16**13

    def fingerprint(self) -> str:
        """One-way fingerprint of the salt, equal across runs with the same salt: scrypt, so that a
        manifest does not let anyone test salt guesses quickly."""
        return "scrypt:" + hashlib.scrypt(self.salt, salt=b"jepa-ray fingerprint", **_SCRYPT).hex()

    def matches(self, fingerprint: str | None) -> bool:
        """Whether a manifest's fingerprint is this salt's (also the fast one older manifests hold)."""
        legacy = self._digest("fingerprint", "jepa-ray")[:16]
        return fingerprint is not None and hmac.compare_digest(
            fingerprint, self.fingerprint() if fingerprint.startswith("scrypt:") else legacy
        )
