"""Ray Jobs from the command line: submit a jepa-ray subcommand to a cluster, follow it, list it.

A job runs one of the entrypoints in `jobs/` (`pretrain`, `tune`, `evaluate`, `prepare`, `bench`)
on the cluster's head, under a runtime environment built here: the checkout's allowlisted files
(`jepa_ray.upload`, staged as the job's `working_dir`) or the jepa-ray installed on the cluster;
pinned pip requirements or a container image; and environment variables. The client talks to the
dashboard's job API, which a jepa-ray cluster binds to a local or cluster-internal address (reach
it through an SSH tunnel or `kubectl port-forward`); Ray's token authentication is honoured
(`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`), the token never travels over plain
http to another machine unless asked to (`insecure_http`), and so is `RAY_ADDRESS`. What is
printed about a job has its secrets masked (`jepa_ray.redact`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jepa_ray import __version__
from jepa_ray.errors import JepaRayError, JobError  # JobError: also importable from here
from jepa_ray.redact import redact, redact_text
from jepa_ray.upload import Upload, config_in_checkout, config_paths, plan_upload, resolve_checkout, staged

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINTS = ("pretrain", "tune", "evaluate", "prepare", "bench", "index")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PINNED = re.compile(r"^[A-Za-z0-9_.\-\[\],]+\s*(===?\s*\S+|\s@\s*\S+)")


# --- where the cluster is, and how to authenticate --------------------------------------------


def resolve_address(address: str | None = None) -> str:
    """The job API's URL: --address, else RAY_ADDRESS, else the local head's http://127.0.0.1:8265."""
    raw = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    source = "--address" if address else ("RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "default")
    if raw.startswith("ray://"):
        raise JobError(
            f"{raw} ({source}) is a Ray Client address; jobs are submitted to the dashboard's job API, "
            "e.g. http://127.0.0.1:8265"
        )
    if raw == "auto":
        raise JobError(
            f"'auto' ({source}) finds a cluster from a process on one of its nodes; a job is submitted to "
            "the dashboard's job API, e.g. --address http://127.0.0.1:8265"
        )
    url = raw if "://" in raw else f"http://{raw}"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JobError(f"cannot read {raw!r} ({source}) as a job API address such as http://127.0.0.1:8265")
    return url


def _unreachable(url: str, why: str) -> JobError:
    return JobError(
        f"no Ray job API answers at {url} ({why}). Start a local head with `cluster/local-head.sh start`, "
        "or open a tunnel to the cluster's dashboard (`ray dashboard cluster/aws-gpu.yaml`, or "
        "`kubectl port-forward svc/jepa-ray-head-svc 8265:8265`) and pass --address "
        "http://127.0.0.1:8265 or set RAY_ADDRESS"
    )


def check_reachable(url: str, headers: dict | None = None, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """The cluster's Ray version; fails in seconds, saying what to do, when nothing (or something
    other than a Ray job API) answers at the address, or when it refuses the credentials."""
    import requests

    try:
        r = requests.get(f"{url}/api/version", headers=headers or {}, timeout=timeout)
    except requests.exceptions.Timeout:
        raise _unreachable(url, f"no answer within {timeout:.0f} s") from None
    except requests.exceptions.ConnectionError as e:
        reason = e.args[0] if e.args else e
        why = getattr(getattr(reason, "reason", None), "args", [None])[-1] or reason
        raise _unreachable(url, str(why).split("] ")[-1][:120]) from None
    if r.status_code in (401, 403):
        return ""  # the job client reports it, with where the token came from
    try:
        version = r.json()["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise JobError(
            f"{url} answers, but not as a Ray job API (HTTP {r.status_code} for /api/version): "
            "check the address and port (the dashboard's, 8265 by default)"
        ) from None
    return str(version)


def auth_token() -> tuple[str | None, str]:
    """Ray's token and where it came from: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
    None with RAY_AUTH_MODE=disabled or when there is none (a cluster without authentication)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token: {e.strerror or e}") from None
        if not token:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"


def is_loopback(host: str) -> bool:
    """Whether a URL's host is this machine: localhost, 127.0.0.0/8 or ::1 (names are not resolved)."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def check_transport(url: str, token_source: str | None, insecure_http: bool = False) -> None:
    """Refuse to send a token (read from `token_source`; None: no token) in clear text to another
    machine: over http only to a loopback address (a tunnel's end), unless `insecure_http`."""
    parsed = urlparse(url)
    if token_source is None or insecure_http or parsed.scheme != "http":
        return
    if is_loopback(parsed.hostname or ""):
        return
    raise JobError(
        f"{url}: refusing to send the Ray token (from {token_source}) over plain http to "
        f"{parsed.hostname}, another machine: it would cross the network in clear text. Reach the job "
        "API through a tunnel ending on this machine (`ray dashboard cluster/aws-gpu.yaml`, "
        "`ssh -L 8265:127.0.0.1:8265 <head>`, `kubectl port-forward svc/jepa-ray-head-svc 8265:8265`) "
        "and pass --address http://127.0.0.1:8265, or use an https:// address; --insecure-http sends "
        "it anyway"
    )


class Jobs:
    """A connection to one cluster's job API, with jepa-ray's error messages."""

    def __init__(
        self, address: str | None = None, timeout: float = CONNECT_TIMEOUT_S, insecure_http: bool = False
    ) -> None:
        import logging

        # Ray logs every .gitignore it honours while packaging the working directory
        logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
        self.url = resolve_address(address)
        token, self.token_source = auth_token()
        check_transport(self.url, self.token_source if token else None, insecure_http)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.ray_version = check_reachable(self.url, headers, timeout)
        self.client = self._call(lambda: _client_class()(self.url, headers=headers), "connect to the job API")

    def _call(self, fn: Callable[[], Any], what: str, job: str | None = None) -> Any:
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as e:
            refused = "Forbidden" in str(e) or "invalid" in str(e).lower()
            raise JobError(
                f"the Ray cluster at {self.url} "
                + (
                    f"refused the token from {self.token_source}"
                    if refused
                    else f"requires a token and none was sent ({self.token_source})"
                )
                + ": set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding the cluster's token "
                "(`cluster/local-head.sh start` prints where the local head's is)"
            ) from None
        except ConnectionError as e:
            raise JobError(f"lost the job API at {self.url} while trying to {what}: {e}") from None
        except RuntimeError as e:
            if job is not None and ("404" in str(e) or "does not exist" in str(e)):
                raise JobError(
                    f"no job {job!r} on the cluster at {self.url} (`jepa-ray jobs list`)"
                ) from None
            raise JobError(f"the job API at {self.url} could not {what}: {e}") from None

    def submit(self, spec: JobSpec) -> str:
        """Submit the job; its upload is staged in a temporary folder, which Ray packs and sends
        before this returns, and which is removed then."""
        with staged(spec.upload) as working_dir:
            runtime_env = dict(spec.runtime_env)
            if working_dir is not None:
                runtime_env["working_dir"] = str(working_dir)
            return self._call(
                lambda: self.client.submit_job(
                    entrypoint=spec.entrypoint,
                    runtime_env=runtime_env,
                    submission_id=spec.submission_id,
                    metadata=spec.metadata,
                ),
                "submit the job",
            )

    def info(self, job: str):
        return self._call(lambda: self.client.get_job_info(job), "read the job's status", job)

    def logs(self, job: str) -> str:
        return self._call(lambda: self.client.get_job_logs(job), "read the job's logs", job)

    def list(self) -> list:
        return self._call(self.client.list_jobs, "list the jobs")

    def stop(self, job: str) -> bool:
        return self._call(lambda: self.client.stop_job(job), "stop the job", job)

    def follow(self, job: str, write: Callable[[str], None], poll_s: float = 1.0):
        """Stream the job's logs through `write` until it ends; returns its final JobInfo.
        Follows Ray's log websocket, and falls back to polling when that connection drops."""
        shown = 0

        async def tail() -> None:
            nonlocal shown
            async for chunk in self.client.tail_job_logs(job):
                write(chunk)
                shown += len(chunk)

        with contextlib.suppress(RuntimeError, OSError):  # the websocket went away: poll instead
            asyncio.run(tail())
        while True:
            info = self.info(job)
            if status_name(info) in TERMINAL:
                break
            time.sleep(poll_s)
        rest = self.logs(job)
        if len(rest) > shown:
            write(rest[shown:])
        return info


def _client_class():
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient


def status_name(info) -> str:
    s = info.status
    return str(s.value if hasattr(s, "value") else s)


# --- what the job runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """A submission: the entrypoint, its runtime environment (without working_dir: `Jobs.submit`
    stages `upload` and adds it), the id it is known by, and what it uploads (None: nothing)."""

    entrypoint: str
    runtime_env: dict
    submission_id: str
    metadata: dict
    upload: Upload | None = None


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise JobError(f"--env {item!r}: expected NAME=value with NAME a valid variable name")
        env[key] = value
    return env


def read_requirements(path: Path) -> list[str]:
    """Pinned requirement lines (name==version, or name @ URL) of a requirements file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise JobError(f"--pip {path}: cannot read the requirements file: {e.strerror or e}") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise JobError(f"--pip {path}: the requirements file lists no package")
    for i, ln in enumerate(lines, 1):
        if ln.startswith("-"):
            raise JobError(f"--pip {path}: '{ln}': pip options are not supported here, list packages only")
        if not _PINNED.match(ln):
            raise JobError(
                f"--pip {path}: '{ln}' is not pinned (requirement {i}): write name==version so every "
                "node installs the same thing"
            )
    return lines


def build_runtime_env(pip: Path | None = None, image: str | None = None, env: Sequence[str] = ()) -> dict:
    """Ray's runtime_env for a jepa-ray job, less the working_dir (see `JobSpec`)."""
    if pip is not None and image is not None:
        raise JobError("--pip and --image exclude each other: install the requirements in the image")
    runtime_env: dict[str, Any] = {}
    if pip is not None:
        runtime_env["pip"] = {"packages": read_requirements(Path(pip)), "pip_check": False}
    if image is not None:
        if not image.strip() or any(c.isspace() for c in image):
            raise JobError(f"--image {image!r}: not a container image reference")
        runtime_env["image_uri"] = image
    env_vars = parse_env(env)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def build_entrypoint(command: str, args: Sequence[str], working_dir: Path | None) -> str:
    """The shell command the job runs: `python jobs/<command>.py ...` in the uploaded checkout, or
    `python -m jepa_ray <command> ...` with the package installed on the cluster (or in --image)."""
    if command not in ENTRYPOINTS:
        raise JobError(f"'{command}' is not a job entrypoint; choose one of: {', '.join(ENTRYPOINTS)}")
    if working_dir is None:
        if command == "bench":
            raise JobError("bench runs the checkout's benchmarks/: submit it with a working directory")
        return shlex.join(["python", "-m", "jepa_ray", command, *args])
    wd = resolve_checkout(working_dir)
    for cfg in config_paths(args):
        if "://" in cfg:
            raise JobError(f"--config {cfg}: a config is a YAML file in the working directory")
        if Path(cfg).is_absolute():
            raise JobError(
                f"--config {cfg}: an absolute path names a file on this machine; the job runs in the "
                f"uploaded {wd.name}/, so give the config's path relative to it"
            )
        config_in_checkout(wd, cfg)
    if command in ("pretrain", "tune"):
        _check_train_paths(args, wd)
    return shlex.join(["python", f"jobs/{command}.py", *args])


def _check_train_paths(args: Sequence[str], wd: Path) -> None:
    """Load the job's config here, so that a bad one fails before submitting, and refuse relative
    data and run paths: in a job they resolve inside the uploaded copy of the checkout, which holds
    no shards and which Ray deletes, checkpoints and all."""
    from jepa_ray.config import load_config

    configs = config_paths(args)
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        cfg = load_config(wd / configs[-1] if configs else None, overrides)
    except JepaRayError as e:
        raise JobError(f"the job's config does not load: {e}") from None
    for key, value in (("train.shards", cfg.train.shards), ("train.storage_path", cfg.train.storage_path)):
        if value and "://" not in value and not Path(value).is_absolute():
            raise JobError(
                f"{key}={value} is a relative path: in a job it would resolve inside the uploaded copy "
                "of the checkout (which Ray deletes); give an absolute path every node sees, or s3://..."
            )


def new_submission_id(command: str) -> str:
    return f"jepa-ray-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def job_spec(
    command: str,
    args: Sequence[str],
    working_dir: Path | None,
    pip: Path | None = None,
    image: str | None = None,
    env: Sequence[str] = (),
    submission_id: str | None = None,
) -> JobSpec:
    """Everything a submission needs, checked here: the entrypoint, what it uploads from
    `working_dir` (None: nothing, the jepa-ray installed on the cluster), its runtime environment."""
    entrypoint = build_entrypoint(command, args, working_dir)
    return JobSpec(
        entrypoint=entrypoint,
        runtime_env=build_runtime_env(pip=pip, image=image, env=env),
        submission_id=submission_id or new_submission_id(command),
        metadata={"jepa_ray_version": __version__, "command": command},
        upload=plan_upload(working_dir, command, args) if working_dir is not None else None,
    )


def log_tail(logs: str, lines: int = 30) -> str:
    return "\n".join(logs.rstrip().splitlines()[-lines:])


# --- what is printed about a job: never its secrets ---------------------------------------------


def describe_job(job: str, info: Any) -> list[str]:
    """The lines `jepa-ray jobs status` prints for a JobInfo, secrets masked (`redact`)."""
    lines = [f"{job}: {status_name(info)}"]
    if info.message:
        lines.append(f"  message: {redact_text(info.message)}")
    lines.append(f"  entrypoint: {redact_text(info.entrypoint or '')}")
    for what, ms in (("started", info.start_time), ("ended", info.end_time)):
        if ms:
            lines.append(f"  {what}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}")
    for what, value in (("runtime env", info.runtime_env), ("metadata", getattr(info, "metadata", None))):
        if value:
            lines.append(f"  {what}: {json.dumps(redact(value))}")
    return lines
