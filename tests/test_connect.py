"""A dead or stale Ray address: a clear error or a fresh local Ray within seconds, never a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from jepa_ray.connect import answers, choose_address
from jepa_ray.errors import JepaRayError


@pytest.fixture
def dead_port():
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_given_address_that_does_not_answer_is_a_clear_error(dead_port):
    t0 = time.perf_counter()
    for address, env, source in (
        (f"127.0.0.1:{dead_port}", "", "ray_address"),
        (None, f"127.0.0.1:{dead_port}", "RAY_ADDRESS"),
    ):
        with pytest.raises(JepaRayError) as info:
            choose_address(address, env)
        assert f"127.0.0.1:{dead_port} ({source})" in str(info.value)
        assert "refused" in str(info.value).lower()
    assert time.perf_counter() - t0 < 5
    with pytest.raises(JepaRayError, match=r"ray://127\.0\.0\.1"):
        choose_address(f"ray://127.0.0.1:{dead_port}")


def test_a_remembered_address_is_used_only_while_it_answers(dead_port, live_port, caplog):
    assert choose_address(None, "", f"127.0.0.1:{live_port}") == f"127.0.0.1:{live_port}"
    assert choose_address(None, "", f"127.0.0.1:{dead_port}") == "local"
    assert "is gone" in caplog.text and f"127.0.0.1:{dead_port}" in caplog.text
    assert choose_address(None, "", None) is None  # nothing remembered: Ray starts a local one
    assert choose_address(f"127.0.0.1:{live_port}", "") == f"127.0.0.1:{live_port}"
    assert answers("auto") is None  # nothing to probe: Ray resolves it


def test_a_command_pointed_at_a_dead_ray_stops_within_seconds(dead_port, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{dead_port}"}
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jepa_ray",
            "prepare",
            "--out",
            str(tmp_path / "out"),
            "--meds",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"no Ray answers at 127.0.0.1:{dead_port} (RAY_ADDRESS)" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "out").exists()
