"""End to end: a real Ray head on 127.0.0.1 started by cluster/local-head.sh (token authentication
on), jobs submitted to it with `jepa-ray submit`, followed, listed, stopped; the head stopped. And,
without Ray: the script's state directory is the user's own, and `stop` signals nothing but this
head's `ray start`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import _free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local-head.sh"


@pytest.fixture(scope="module")
def head():
    """A head of its own (beside the suite's shared Ray), with its own token, for this module."""
    state = Path(tempfile.mkdtemp(prefix="jrh", dir="/tmp"))  # short: Ray puts sockets under it
    token = state / "token"
    token.write_text("jepa-ray-test-token-0123456789abcdef\n")
    dash = _free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "JEPA_RAY_HEAD_DIR": str(state),
        "JEPA_RAY_HEAD_PORT": str(_free_port()),
        "JEPA_RAY_DASHBOARD_PORT": str(dash),
        "JEPA_RAY_HEAD_CPUS": "2",
        "JEPA_RAY_HEAD_ARGS": " ".join(
            f"--{flag}={_free_port()}"
            for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port")
        ),
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        env.pop(var, None)
    out = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"http://127.0.0.1:{dash}"
    assert f"job API and dashboard: {url}" in out.stdout and f"token: {token}" in out.stdout
    pid = int((state / "head.pid").read_text())
    yield {"url": url, "env": env, "state": state}
    out = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Ray head stopped" in out.stdout, out.stdout + out.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    shutil.rmtree(state, ignore_errors=True)


def jepa_ray(head, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jepa_ray", *args],
        cwd=ROOT,
        env={**head["env"], **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _submission_id(stdout: str) -> str:
    return re.search(r"submitted (\S+) to ", stdout).group(1)


def _tiny(shards, runs) -> list[str]:
    return [
        "--config",
        "jepa_ray/configs/demo-cpu.yaml",
        f"train.shards={shards}",
        f"train.storage_path={runs}",
        "train.num_workers=1",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.val_batches=1",
    ]


def test_status_and_a_second_start_reuse_the_running_head(head):
    out = subprocess.run([str(SCRIPT), "status"], env=head["env"], capture_output=True, text=True)
    assert out.returncode == 0 and head["url"] in out.stdout
    out = subprocess.run([str(SCRIPT), "start"], env=head["env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "already running" in out.stdout


def test_submit_pretrain_waits_for_success_and_the_checkpoint_is_in_storage(head, small_shards, tmp_path):
    runs = tmp_path / "runs"
    out = jepa_ray(
        head,
        "submit",
        "--address",
        head["url"],
        "--wait",
        "--",
        "pretrain",
        "--name",
        "job1",
        *_tiny(small_shards, runs),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sid = _submission_id(out.stdout)
    assert f"job {sid} SUCCEEDED" in out.stdout
    assert "run job1: step 4" in out.stdout  # the job's own output, streamed
    checkpoints = sorted(p for p in (runs / "job1").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and any(checkpoints[-1].rglob("*.pt")), list((runs / "job1").iterdir())
    # the other commands see it; RAY_ADDRESS is honoured
    env = {"RAY_ADDRESS": head["url"]}
    listed = jepa_ray(head, "jobs", "list", env=env)
    assert listed.returncode == 0 and re.search(rf"{sid}\s+SUCCEEDED", listed.stdout), listed.stdout
    status = jepa_ray(head, "jobs", "status", sid, env=env)
    assert status.returncode == 0 and f"{sid}: SUCCEEDED" in status.stdout
    assert '"working_dir": "gcs://' in status.stdout  # the checkout was uploaded
    logs = jepa_ray(head, "jobs", "logs", sid, env=env)
    assert logs.returncode == 0 and "run job1: step 4" in logs.stdout


def test_a_failing_job_is_reported_failed_with_its_logs_tail(head, tmp_path):
    missing = tmp_path / "no-shards-here"
    out = jepa_ray(
        head, "submit", "--address", head["url"], "--wait", "--", "pretrain", *_tiny(missing, tmp_path)
    )
    assert out.returncode == 1, out.stdout + out.stderr
    sid = _submission_id(out.stdout)
    assert f"job {sid} FAILED: Job entrypoint command failed with exit code 2" in out.stderr
    tail = out.stderr.split("last lines of its logs:", 1)[1]
    assert str(missing) in tail  # the job's own error names the input
    status = jepa_ray(head, "jobs", "status", sid, "--address", head["url"])
    assert status.returncode == 1 and f"{sid}: FAILED" in status.stdout


def test_stop_a_running_job(head, small_shards, tmp_path):
    args = _tiny(small_shards, tmp_path / "runs")
    args[args.index("train.steps=4")] = "train.steps=100000"
    out = jepa_ray(head, "submit", "--address", head["url"], "--", "pretrain", *args)
    assert out.returncode == 0, out.stderr
    sid = _submission_id(out.stdout)
    assert f"jepa-ray jobs logs {sid} --follow" in out.stdout
    deadline = time.monotonic() + 120
    while "RUNNING" not in (s := jepa_ray(head, "jobs", "status", sid, "--address", head["url"]).stdout):
        assert time.monotonic() < deadline, s
        time.sleep(1)
    stop = jepa_ray(head, "jobs", "stop", sid, "--address", head["url"])
    assert stop.returncode == 0 and f"{sid}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    status = jepa_ray(head, "jobs", "status", sid, "--address", head["url"])
    assert status.returncode == 1 and f"{sid}: STOPPED" in status.stdout


def test_token_authentication_is_enforced_with_clear_errors(head, tmp_path):
    wrong = jepa_ray(head, "jobs", "list", "--address", head["url"], env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 2
    assert f"the Ray cluster at {head['url']} refused the token from RAY_AUTH_TOKEN" in wrong.stderr
    env = {**head["env"], "HOME": str(tmp_path)}  # no token anywhere
    env.pop("RAY_AUTH_TOKEN_PATH")
    out = subprocess.run(
        [sys.executable, "-m", "jepa_ray", "jobs", "list", "--address", head["url"]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "requires a token and none was sent" in out.stderr, out.stderr
    unknown = jepa_ray(head, "jobs", "status", "no-such-job", "--address", head["url"])
    assert unknown.returncode == 2 and "no job 'no-such-job' on the cluster" in unknown.stderr


# -- the state directory and `stop`, with stand-ins for `ray`: no Ray is started below


def _script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("JEPA_RAY_HEAD_DIR", "RAY_ADDRESS")}
    full |= {"PYTHON": sys.executable, **env}
    return subprocess.run([str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=60)


def _fake_ray(tmp_path: Path, body: str) -> Path:
    """A `ray` command that runs `body` (Python) instead of Ray, in its own bin directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    ray = bin_dir / "ray"
    ray.write_text(f"#!{sys.executable}\n{body}\n")
    ray.chmod(0o755)
    return ray


def _detached(*argv: str) -> int:
    """Start a process that is not this one's child (as the script's head is not): its pid."""
    out = subprocess.run(
        ["bash", "-c", '"$@" >/dev/null 2>&1 </dev/null & echo $!', "-", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes() != b"" if Path("/proc").is_dir() else True


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TMPDIR is honoured on Linux only")
def test_the_default_state_dir_is_per_user_and_private(tmp_path):
    ray = _fake_ray(tmp_path, "raise SystemExit(1)")  # a head that exits at once
    env = {
        "TMPDIR": str(tmp_path / "tmp"),
        "PATH": f"{ray.parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_TOKEN": "jepa-ray-test-token-0123456789abcdef",
        "JEPA_RAY_DASHBOARD_PORT": str(_free_port()),
    }
    out = _script("start", env=env)
    assert out.returncode == 1 and "the Ray head exited while starting" in out.stderr, out.stderr
    state = tmp_path / "tmp" / f"jepa-ray-{os.getuid()}"
    st = state.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert (state / "head.log").is_file() and not (state / "head.pid").exists()
    assert _script("status", env=env).stdout.strip() == "not running"


@pytest.mark.parametrize("case", ["writable by others", "another user's", "a symlink"])
def test_a_state_dir_others_could_write_is_refused_and_its_pid_file_ignored(tmp_path, case):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    sleeper = _detached("sleep", "300")
    try:
        (state / "head.pid").write_text(f"{sleeper}\n")
        if case == "writable by others":
            state.chmod(0o777)  # e.g. a directory under /tmp made by someone else's umask
        elif case == "another user's":
            if os.geteuid() != 0:
                pytest.skip("giving a directory to another user needs root")
            os.chown(state, 65534, 65534)
        else:
            link = tmp_path / "link"
            link.symlink_to(state)
            state = link
        for command in ("start", "status", "stop"):
            out = _script(command, env={"JEPA_RAY_HEAD_DIR": str(state)})
            assert out.returncode == 2, (command, out.stdout, out.stderr)
            assert f"error: {state} (the state directory)" in out.stderr, out.stderr
        assert _alive(sleeper)
    finally:
        _kill(sleeper)


def test_stop_leaves_a_process_that_is_not_this_heads_ray_alone(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    sleeper = _detached("sleep", "300")
    try:
        (state / "head.pid").write_text(f"{sleeper}\n")
        out = _script("stop", env={"JEPA_RAY_HEAD_DIR": str(state)})
        assert out.returncode == 1
        assert f"names pid {sleeper}, which is not this head's Ray process" in out.stderr
        assert "sleep 300" in out.stderr and "not signalling it" in out.stderr
        time.sleep(0.5)
        assert _alive(sleeper)
        assert _script("status", env={"JEPA_RAY_HEAD_DIR": str(state)}).returncode == 1
    finally:
        _kill(sleeper)


def test_stop_stops_this_heads_ray_start_and_not_another_heads(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ray = _fake_ray(tmp_path, "import time; time.sleep(300)")  # stands for `ray start --block`
    env = {"JEPA_RAY_HEAD_DIR": str(state)}
    other = _detached(str(ray), "start", "--head", "--block", f"--temp-dir={tmp_path / 'other'}/ray")
    mine = _detached(str(ray), "start", "--head", "--block", f"--temp-dir={state}/ray", "--port=6390")
    try:
        (state / "head.pid").write_text(f"{other}\n")  # a Ray, but another head's
        out = _script("stop", env=env)
        assert out.returncode == 1 and "not this head's Ray process" in out.stderr
        (state / "head.pid").write_text(f"{mine}\n")
        out = _script("status", env=env)
        assert out.returncode == 0 and f"running (pid {mine})" in out.stdout
        out = _script("stop", env=env)
        assert out.returncode == 0 and "Ray head stopped" in out.stdout, out.stdout + out.stderr
        deadline = time.monotonic() + 10
        while _alive(mine) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(mine) and _alive(other)
        assert not (state / "head.pid").exists()
    finally:
        _kill(mine)
        _kill(other)
