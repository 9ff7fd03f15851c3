"""Pseudonyms: stable for a salt, different across salts, no salt → clear error."""

from __future__ import annotations

import pytest

from jepa_ray.config import DeidConfig
from jepa_ray.data.deid import Pseudonymizer
from jepa_ray.errors import ConfigError


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
    monkeypatch.setenv("JEPA_RAY_SALT", "short")
    with pytest.raises(ConfigError, match="at least 8"):
        DeidConfig().resolve_salt()
    f = tmp_path / "salt"
    f.write_text("a-long-enough-salt\n")
    assert DeidConfig(salt_file=str(f)).resolve_salt() == b"a-long-enough-salt"
    with pytest.raises(ConfigError, match="cannot read"):
        DeidConfig(salt_file=str(tmp_path / "nope")).resolve_salt()
