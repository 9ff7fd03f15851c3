"""Which Ray a command's driver joins: the cluster it is told to, a live local Ray, or a fresh one.

`ray.init` retries an unreachable GCS for a long time, and without an address it joins the cluster
whose address the last `ray start` left in Ray's temp directory even when that Ray has died (a
head killed by a signal leaves it behind): every command would then hang. So before `ray.init`:

- an address given (`ray_address` in the config, or RAY_ADDRESS) must answer a TCP connection
  within seconds, else the command stops with an error naming the address and where it came from;
- a remembered address is used only while something listens there; otherwise it is ignored (with
  a warning) and a fresh local Ray is started.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from jepa_ray.errors import JepaRayError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'host:port' or 'ray://host:port'; None when there is no port to probe."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def answers(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when something accepts a TCP connection at the address, else why not."""
    hp = _host_port(address)
    if hp is None:
        return None  # nothing to probe (e.g. 'auto'): Ray resolves it
    try:
        with socket.create_connection(hp, timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or type(e).__name__


def remembered_address(temp_dir: str | None = None) -> str | None:
    """The address the last `ray start` on this machine left behind (what `ray.init()` joins), if any."""
    try:
        from ray._private.utils import get_ray_address_file

        path = Path(get_ray_address_file(temp_dir))
    except (ImportError, AttributeError):  # another Ray layout: its default place
        path = Path(temp_dir or "/tmp/ray") / "ray_current_cluster"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def choose_address(
    address: str | None,
    env: str | None = None,
    remembered: str | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> str | None:
    """The address for `ray.init`: a given one that answers (JepaRayError when it does not), a
    remembered one that answers, "local" (a fresh local Ray) when the remembered one is dead, None
    when there is nothing to join (Ray starts a local one)."""
    given, source = (address, "ray_address") if address else (env, "RAY_ADDRESS")
    if given:
        why = answers(given, timeout)
        if why is not None:
            raise JepaRayError(
                f"no Ray answers at {given} ({source}): {why}. Start that cluster (or check the address "
                "and port: the GCS's, 6379 by default), or unset it to run on a local Ray"
            )
        return given
    if remembered:
        why = answers(remembered, timeout)
        if why is None:
            return remembered
        logger.warning(
            "the Ray last started on this machine (%s) is gone (%s): starting a fresh local Ray",
            remembered,
            why,
        )
        return "local"
    return None


def ray_init_address(address: str | None) -> str | None:
    """`choose_address` with this process's RAY_ADDRESS and Ray's remembered address."""
    env = os.environ.get("RAY_ADDRESS", "")
    return choose_address(address, env, None if (address or env) else remembered_address())
