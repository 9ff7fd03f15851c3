"""Pseudonyms: stable for a salt, different across salts, no salt → clear error."""

from __future__ import annotations

import pytest

from jepa_ray.config import DeidConfig
from jepa_ray.errors import ConfigError
from jepa_ray.ingest.deid import Pseudonymizer


def test_pseudonyms_are_stable_and_salted():
    a, b = Pseudonymizer(b"salt-one-123"), Pseudonymizer(b"salt-two-456")
    assert a.subject("123") == a.subject(123) == Pseudonymizer(b"salt-one-123").subject("123")
    assert a.subject("123") != b.subject("123") and a.subject("123") != a.subject("124")
    assert a.study("1", "1.2.3") != a.study("2", "1.2.3")
    assert a.site("Saint X Hospital") == a.site(" saint x hospital ") != b.site("Saint X Hospital")
    assert a.site(None) == "site-unknown"
    assert "123" not in a.subject("123")[1:7] or a.subject("123") != "p123"
    assert a.fingerprint() != b.fingerprint()
    units = [a.unit(a.subject(i)) for i in range(2000)]
    assert min(units) >= 0 and max(units) < 1
    assert abs(sum(u < 0.1 for u in units) / 2000 - 0.1) < 0.03


def test_missing_or_short_salt_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("JEPA_RAY_SALT", raising=False)
    with pytest.raises(ConfigError, match="JEPA_RAY_SALT"):
        DeidConfig().resolve_salt()
    monkeypatch.setenv("JEPA_RAY_SALT", "x" * 31)
    with pytest.raises(ConfigError, match=r"\$JEPA_RAY_SALT: the salt has 31 characters, fewer than 32"):
        DeidConfig().resolve_salt()
    f = tmp_path / "salt"
    f.write_text("hospital2026\n")  # what a person picks: guessable
    with pytest.raises(ConfigError, match=r"deid.salt_file .*salt: the salt has 12 characters"):
        DeidConfig(salt_file=str(f)).resolve_salt()
    f.write_text("a" * 40 + "\n")
    assert DeidConfig(salt_file=str(f)).resolve_salt() == b"a" * 40
    with pytest.raises(ConfigError, match="cannot read"):
        DeidConfig(salt_file=str(tmp_path / "nope")).resolve_salt()


def test_salt_new_writes_a_random_private_salt_and_never_overwrites(tmp_path):
    import stat

    from typer.testing import CliRunner

    from jepa_ray.cli import app

    path = tmp_path / "salt"
    out = CliRunner().invoke(app, ["salt", "new", str(path)])
    assert out.exit_code == 0, out.output
    salt = path.read_text().strip()
    assert len(salt) == 64 and int(salt, 16) >= 0  # 32 random bytes, hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert DeidConfig(salt_file=str(path)).resolve_salt() == salt.encode()
    again = CliRunner().invoke(app, ["salt", "new", str(path)])
    assert again.exit_code == 2 and "never overwritten" in again.output
    assert path.read_text().strip() == salt
    other = tmp_path / "salt2"
    CliRunner().invoke(app, ["salt", "new", str(other)])
    assert other.read_text() != path.read_text()


def test_the_fingerprint_is_slow_to_test_and_the_salt_never_printed():
    import time

    salt = b"s" * 40
    pz = Pseudonymizer(salt)
    assert "sss" not in repr(pz) and "sss" not in str(pz)
    t0 = time.perf_counter()
    fp = pz.fingerprint()
    assert time.perf_counter() - t0 > 0.005  # scrypt: a guess costs milliseconds, not nanoseconds
    assert fp.startswith("scrypt:") and fp == Pseudonymizer(salt).fingerprint()
    assert pz.matches(fp) and not Pseudonymizer(b"t" * 40).matches(fp)
    # a manifest written before the slow fingerprint still identifies its salt
    legacy = pz._digest("fingerprint", "jepa-ray")[:16]
    assert pz.matches(legacy) and not Pseudonymizer(b"t" * 40).matches(legacy) and not pz.matches(None)


def test_a_path_that_is_not_utf8_hashes_as_its_bytes_and_utf8_paths_keep_their_pseudonyms():
    """A Latin-1 file name from a Windows export (Python holds its byte 0xFC as a surrogate escape)
    is pseudonymised as its bytes; a UTF-8 path's pseudonym is what it always was, so shards
    written before keep their keys and input names."""
    import hashlib
    import hmac
    import os

    salt = b"s" * 40
    pz = Pseudonymizer(salt)

    def expected(kind: str, raw: bytes) -> str:
        return hmac.new(salt, kind.encode() + b"\x1f" + raw, hashlib.sha256).hexdigest()

    for utf8 in ("site0/000001/1.dcm", "Müller/ü.dcm"):
        assert pz.path(utf8) == "path-" + expected("path", utf8.encode("utf-8"))[:16]
    latin1 = os.fsdecode(b"M\xfcller.dcm")
    assert pz.path(latin1) == "path-" + expected("path", b"M\xfcller.dcm")[:16]
    assert len({pz.path(latin1), pz.path("Müller.dcm"), pz.path(os.fsdecode(b"M\xfdller.dcm"))}) == 3
    # a study keyed by its file's path (no StudyInstanceUID, no SOPInstanceUID)
    assert pz.study("P1", latin1) == "s" + expected("study", b"P1\x1fM\xfcller.dcm")[:20]
