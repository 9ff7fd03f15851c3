"""End to end: a real Ray head on 127.0.0.1 started by cluster/local-head.sh (token authentication
on), jobs submitted to it with `jepa-ray submit`, followed, listed, stopped; the head stopped."""

from __future__ import annotations

import os
import re
import shutil
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
        "jobs/configs/demo-cpu.yaml",
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


def test_a_tune_sweep_runs_as_a_job(head, small_shards, tmp_path):
    sweeps = tmp_path / "sweeps"
    args = [
        "--config",
        "jobs/configs/tune-demo.yaml",
        "--name",
        "sweep1",
        f"train.shards={small_shards}",
        f"train.storage_path={sweeps}",
        "train.steps=20",
        "train.warmup_steps=2",
        "train.checkpoint_every=20",
        "tune.eval_every=10",
        "tune.eval_batches=2",
        "tune.asha.grace_period=10",
        "tune.space={pipeline.mask.mask_ratio: {values: [0.6]}}",  # one trial: the job is what is tested
    ]
    out = jepa_ray(head, "submit", "--address", head["url"], "--wait", "--", "tune", *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout
    rows = (sweeps / "sweep1" / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and "TERMINATED" in rows[1] and "0.6" in rows[1], rows
    assert (sweeps / "sweep1" / "best.yaml").is_file()


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
