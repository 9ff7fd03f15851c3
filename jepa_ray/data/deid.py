"""De-identification: salted HMAC pseudonyms for subjects, studies and sites.

The salt keys every pseudonym and is never written anywhere; only a one-way fingerprint of it
goes into the manifest, so that a rerun with another salt is detected instead of mixing ids.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass


@dataclass(frozen=True)
class Pseudonymizer:
    """Maps raw identifiers to stable pseudonyms: HMAC-SHA256(salt, kind + value)."""

    salt: bytes

    def _digest(self, kind: str, value: str) -> str:
        return hmac.new(self.salt, f"{kind}\x1f{value}".encode(), hashlib.sha256).hexdigest()

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
        """Pseudonym of an input path, for manifests whose paths may carry identifiers."""
        return "path-" + self._digest("path", relative_path)[:16]

    def unit(self, subject_pseudonym: str) -> float:
        """A uniform number in [0, 1) per subject, for deterministic split assignment."""
        return int(self._digest("split", subject_pseudonym)[:13], 16) / 16**13

    def fingerprint(self) -> str:
        """One-way fingerprint of the salt: equal across runs with the same salt, reveals nothing."""
        return self._digest("fingerprint", "jepa-ray")[:16]
