"""Job submission without a cluster: addresses, tokens, runtime environments, entrypoints, errors."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import _free_port
from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.submit import (
    EXCLUDES,
    JobError,
    auth_token,
    build_entrypoint,
    build_runtime_env,
    check_reachable,
    checkout_root,
    job_spec,
    resolve_address,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "jobs/configs/demo-cpu.yaml"


def test_address_comes_from_the_flag_then_ray_address_then_the_local_head(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert resolve_address() == "http://10.0.0.5:8265"
    assert resolve_address("https://ray.example.org/") == "https://ray.example.org"
    with pytest.raises(JobError, match=r"ray://h:10001 \(--address\) is a Ray Client address"):
        resolve_address("ray://h:10001")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(JobError, match=r"'auto' \(RAY_ADDRESS\)"):
        resolve_address()
    with pytest.raises(JobError, match="ftp://x"):
        resolve_address("ftp://x")


def test_nothing_listening_fails_within_seconds_naming_the_address():
    url = f"http://127.0.0.1:{_free_port()}"
    t = time.monotonic()
    with pytest.raises(JobError, match=rf"no Ray job API answers at {url} \(.*refused.*local-head.sh start"):
        check_reachable(url)
    assert time.monotonic() - t < 5


def test_a_server_that_never_answers_or_is_not_ray_is_given_up_quickly():
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t = time.monotonic()
        with pytest.raises(JobError, match=rf"no Ray job API answers at {url} \(no answer within 1 s\)"):
            check_reachable(url, timeout=1.0)
        assert time.monotonic() - t < 4

    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(
            JobError, match=r"answers, but not as a Ray job API \(HTTP 404 for /api/version\)"
        ):
            check_reachable(url)
    finally:
        server.shutdown()


def test_submit_to_an_unreachable_address_is_a_clear_error_not_a_hang(monkeypatch):
    url = f"http://127.0.0.1:{_free_port()}"
    t = time.monotonic()
    result = CliRunner().invoke(
        app,
        [
            "submit",
            "--address",
            url,
            "--",
            "pretrain",
            "--config",
            CONFIG,
            "train.storage_path=/r",
            "train.shards=/s",
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"no Ray job API answers at {url}" in result.output
    assert time.monotonic() - t < 10
    monkeypatch.setenv("RAY_ADDRESS", url)  # the same through RAY_ADDRESS, for the other commands
    for args in (["jobs", "list"], ["jobs", "status", "x"], ["jobs", "logs", "x"], ["jobs", "stop", "x"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and f"no Ray job API answers at {url}" in result.output, args


def test_token_precedence_and_bad_token_files(monkeypatch, tmp_path):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token()[0] is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert auth_token() == ("home-token", str(tmp_path / ".ray" / "auth_token"))
    path = tmp_path / "cluster-token"
    path.write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert auth_token() == ("path-token", f"RAY_AUTH_TOKEN_PATH={path}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert auth_token() == ("env-token", "RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token()[0] is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    path.write_text("  \n")
    with pytest.raises(JobError, match=f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty"):
        auth_token()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobError, match="missing: cannot read the token"):
        auth_token()


def test_runtime_env_of_a_checkout_with_pins_image_and_env(tmp_path):
    assert checkout_root() == ROOT
    env = build_runtime_env(ROOT, env=["PYTHONUNBUFFERED=1", "EMPTY="])
    assert env == {
        "working_dir": str(ROOT),
        "excludes": EXCLUDES,
        "env_vars": {"PYTHONUNBUFFERED": "1", "EMPTY": ""},
    }
    req = tmp_path / "requirements.txt"
    req.write_text("# pinned\nnumpy==2.1.3\nfoo[extra]==1.0  # comment\nbar @ https://example.org/bar.whl\n")
    env = build_runtime_env(None, pip=req)
    assert env == {
        "pip": {
            "packages": ["numpy==2.1.3", "foo[extra]==1.0", "bar @ https://example.org/bar.whl"],
            "pip_check": False,
        }
    }
    assert build_runtime_env(None, image="registry.example.org/jepa-ray:0.1.0") == {
        "image_uri": "registry.example.org/jepa-ray:0.1.0"
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"working_dir": "tmp"}, "not a jepa-ray checkout"),
        ({"pip": "unpinned"}, r"'numpy>=2' is not pinned \(requirement 2\)"),
        ({"pip": "options"}, "'--index-url x': pip options are not supported"),
        ({"pip": "missing"}, "missing.txt: cannot read the requirements file"),
        ({"pip": "pinned", "image": "img:1"}, "--pip and --image exclude each other"),
        ({"image": "bad image"}, "not a container image reference"),
        ({"env": ["1BAD=x"]}, r"--env '1BAD=x': expected NAME=value"),
        ({"env": ["NOEQUALS"]}, r"--env 'NOEQUALS'"),
    ],
)
def test_bad_runtime_env_inputs_name_the_input(tmp_path, kwargs, message):
    files = {
        "unpinned": "torch==2.13.0\nnumpy>=2\n",
        "options": "--index-url x\n",
        "pinned": "numpy==2.1.3\n",
    }
    args = dict(kwargs)
    if args.get("working_dir") == "tmp":
        args["working_dir"] = tmp_path
    if "pip" in args:
        path = tmp_path / f"{args['pip']}.txt"
        if args["pip"] in files:
            path.write_text(files[args["pip"]])
        args["pip"] = path
    with pytest.raises(JobError, match=message):
        build_runtime_env(args.pop("working_dir", None), **args)


def test_entrypoints_for_a_checkout_and_for_the_installed_package():
    args = ["--config", "jobs/configs/demo-cpu.yaml", "train.storage_path=/shared/runs", "--name", "a b"]
    assert build_entrypoint("pretrain", args, ROOT) == (
        "python jobs/pretrain.py --config jobs/configs/demo-cpu.yaml train.storage_path=/shared/runs "
        "--name 'a b'"
    )
    tune = ["--config=jobs/configs/tune-demo.yaml", "train.shards=/data/shards", "train.storage_path=/runs"]
    assert build_entrypoint("tune", tune, ROOT).startswith("python jobs/tune.py --config=jobs/configs/tune")
    with pytest.raises(JobError, match=r"--config s3://b/t\.yaml: a config is a YAML file in the working"):
        build_entrypoint("tune", ["--config", "s3://b/t.yaml"], ROOT)
    assert build_entrypoint("evaluate", ["--out", "e"], None) == "python -m jepa_ray evaluate --out e"
    spec = job_spec("prepare", ["--out", "s"], ROOT, env=["A=1"])
    assert spec.submission_id.startswith("jepa-ray-prepare-")
    assert spec.metadata["command"] == "prepare" and spec.runtime_env["env_vars"] == {"A": "1"}
    with pytest.raises(JobError, match="'train' is not a job entrypoint; choose one of: pretrain, tune"):
        build_entrypoint("train", [], ROOT)
    with pytest.raises(JobError, match="bench runs the checkout's benchmarks/"):
        build_entrypoint("bench", ["train"], None)
    with pytest.raises(JobError, match=r"--config jobs/configs/nope\.yaml: no such file in the working"):
        build_entrypoint("pretrain", ["-c", "jobs/configs/nope.yaml"], ROOT)
    # the config loads before submitting, and relative data/run paths would end in Ray's temp copy
    with pytest.raises(JobError, match=r"train.storage_path=./demo/runs is a relative path"):
        build_entrypoint("pretrain", ["--config", "jobs/configs/demo-cpu.yaml"], ROOT)
    with pytest.raises(JobError, match=r"train.shards=demo/shards is a relative path"):
        build_entrypoint("tune", ["train.shards=demo/shards", "train.storage_path=s3://b/r"], ROOT)
    with pytest.raises(JobError, match=r"the job's config does not load: .*train.stepz"):
        build_entrypoint("pretrain", ["train.stepz=3"], ROOT)
    with pytest.raises(JobError, match="an absolute path names a file on this machine"):
        build_entrypoint("pretrain", ["--config", str(ROOT / "jobs/configs/demo-cpu.yaml")], ROOT)


def test_cli_refuses_conflicting_packaging_before_connecting():
    result = CliRunner().invoke(app, ["submit", "--installed", "--working-dir", ".", "--", "pretrain"])
    assert result.exit_code == 2 and "--installed and --working-dir exclude each other" in result.output
    result = CliRunner().invoke(app, ["submit", "--address", "http://127.0.0.1:1", "--", "train"])
    assert result.exit_code == 2 and "'train' is not a job entrypoint" in result.output


def test_job_entrypoint_scripts_run_the_commands(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in ("pretrain", "tune", "evaluate", "prepare"):
        out = subprocess.run(
            [sys.executable, f"jobs/{command}.py", "--help"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        assert f"Usage: jobs/{command}.py {command}" in out.stdout
    out = subprocess.run(
        [sys.executable, "jobs/bench.py", "nope"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    names = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert out.returncode == 1 and len(names) >= 7
    assert f"got 'nope'; name a benchmark: {', '.join(names)}" in out.stderr
    out = subprocess.run(
        [sys.executable, "jobs/bench.py", "model", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "usage: bench_model.py" in out.stdout, out.stderr


def test_a_job_api_address_in_ray_address_is_not_a_cluster_to_run_a_driver_on(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    out = subprocess.run(
        [sys.executable, "-m", "jepa_ray", "pretrain", "--config", "jobs/configs/demo-cpu.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "RAY_ADDRESS=http://127.0.0.1:8265 is a job API address" in out.stderr
    assert "jepa-ray submit -- <command>" in out.stderr
