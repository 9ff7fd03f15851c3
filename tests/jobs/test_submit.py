"""Job submission without a cluster: addresses, tokens, runtime environments, entrypoints, what is
uploaded (through Ray's own packaging code), what is printed about a job, errors."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import _free_port
from typer.testing import CliRunner

from jepa_ray.cli import app
from jepa_ray.errors import JobError
from jepa_ray.redact import redact, redact_text
from jepa_ray.submit import (
    Jobs,
    auth_token,
    build_entrypoint,
    build_runtime_env,
    check_reachable,
    check_transport,
    describe_job,
    is_loopback,
    job_spec,
    resolve_address,
)
from jepa_ray.upload import MAX_UPLOAD_BYTES, checkout_root, plan_upload

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "jepa_ray/configs/demo-cpu.yaml"


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
    spec = job_spec("prepare", ["--out", "/s"], ROOT, env=["PYTHONUNBUFFERED=1", "EMPTY="])
    # the working_dir is added when the upload is staged, at submission
    assert spec.runtime_env == {"env_vars": {"PYTHONUNBUFFERED": "1", "EMPTY": ""}}
    assert spec.upload.root == ROOT and "jobs/prepare.py" in spec.upload.files
    req = tmp_path / "requirements.txt"
    req.write_text("# pinned\nnumpy==2.1.3\nfoo[extra]==1.0  # comment\nbar @ https://example.org/bar.whl\n")
    env = build_runtime_env(pip=req)
    assert env == {
        "pip": {
            "packages": ["numpy==2.1.3", "foo[extra]==1.0", "bar @ https://example.org/bar.whl"],
            "pip_check": False,
        }
    }
    assert build_runtime_env(image="registry.example.org/jepa-ray:0.1.0") == {
        "image_uri": "registry.example.org/jepa-ray:0.1.0"
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
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
    if "pip" in args:
        path = tmp_path / f"{args['pip']}.txt"
        if args["pip"] in files:
            path.write_text(files[args["pip"]])
        args["pip"] = path
    with pytest.raises(JobError, match=message):
        build_runtime_env(**args)


def test_entrypoints_for_a_checkout_and_for_the_installed_package():
    args = ["--config", "jepa_ray/configs/demo-cpu.yaml", "train.storage_path=/shared/runs", "--name", "a b"]
    assert build_entrypoint("pretrain", args, ROOT) == (
        "python jobs/pretrain.py --config jepa_ray/configs/demo-cpu.yaml train.storage_path=/shared/runs "
        "--name 'a b'"
    )
    tune = [
        "--config=jepa_ray/configs/tune-demo.yaml",
        "train.shards=/data/shards",
        "train.storage_path=/runs",
    ]
    assert build_entrypoint("tune", tune, ROOT).startswith(
        "python jobs/tune.py --config=jepa_ray/configs/tune"
    )
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
        build_entrypoint("pretrain", ["--config", "jepa_ray/configs/demo-cpu.yaml"], ROOT)
    with pytest.raises(JobError, match=r"train.shards=demo/shards is a relative path"):
        build_entrypoint("tune", ["train.shards=demo/shards", "train.storage_path=s3://b/r"], ROOT)
    with pytest.raises(JobError, match=r"the job's config does not load: .*train.stepz"):
        build_entrypoint("pretrain", ["train.stepz=3"], ROOT)
    with pytest.raises(JobError, match="an absolute path names a file on this machine"):
        build_entrypoint("pretrain", ["--config", str(ROOT / "jepa_ray/configs/demo-cpu.yaml")], ROOT)


def test_cli_refuses_conflicting_packaging_before_connecting():
    result = CliRunner().invoke(app, ["submit", "--installed", "--working-dir", ".", "--", "pretrain"])
    assert result.exit_code == 2 and "--installed and --working-dir exclude each other" in result.output
    result = CliRunner().invoke(app, ["submit", "--address", "http://127.0.0.1:1", "--", "train"])
    assert result.exit_code == 2 and "'train' is not a job entrypoint" in result.output


def test_job_entrypoint_scripts_run_the_commands(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def job(*args: str):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)

    for command in ("pretrain", "tune", "evaluate", "prepare"):
        out = job(f"jobs/{command}.py", "--help")
        assert out.returncode == 0, out.stderr
        assert f"Usage: jobs/{command}.py {command}" in out.stdout
    out = job("jobs/bench.py", "nope")
    names = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))
    names.remove("train")  # `bench train` is the jepa-ray command
    assert out.returncode == 1 and len(names) >= 6
    assert f"got 'nope'; name a command (train, stream) or a benchmark: {', '.join(names)}" in out.stderr
    out = job("jobs/bench.py", "train", "--help")
    assert out.returncode == 0 and "Usage: jobs/bench.py bench train" in out.stdout, out.stderr
    out = job("jobs/bench.py", "model", "--help")
    assert out.returncode == 0 and "usage: bench_model.py" in out.stdout, out.stderr


def test_a_job_api_address_in_ray_address_is_not_a_cluster_to_run_a_driver_on(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    out = subprocess.run(
        [sys.executable, "-m", "jepa_ray", "pretrain", "--config", "jepa_ray/configs/demo-cpu.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "RAY_ADDRESS=http://127.0.0.1:8265 is a job API address" in out.stderr
    assert "jepa-ray submit -- <command>" in out.stderr


# --- what a submission uploads -----------------------------------------------------------------

SOURCES = {
    "jepa_ray/__init__.py": "__version__ = '0.1.0'\n",
    "jepa_ray/py.typed": "",
    "jepa_ray/ingest/dicom.py": "X = 1\n",
    "jobs/_entry.py": "",
    "jobs/pretrain.py": "",
    "jobs/prepare.py": "",
    "jobs/configs/demo.yaml": "train: {steps: 2}\n",
    "my/exp.yaml": "prepare: {}\n",  # outside the allowlist: uploaded because --config names it
    "pyproject.toml": "[project]\nname = 'jepa-ray'\n",
    "constraints.txt": "numpy==2.1.3\n",
    "README.md": "# jepa-ray\n",
}
SECRETS_INSIDE = [  # in uploaded folders: left out, and named in a warning
    "jobs/configs/.env",
    "jepa_ray/secret.key",
    "jepa_ray/.aws/credentials",
    "jobs/credentials.json",
    "jobs/configs/salt",
]
OUTSIDE = [".env", ".aws/credentials", "id_rsa", "server.pem", "salt", ".netrc", "runs/x.pt", "shards/a.tar"]


def fake_checkout(root: Path) -> Path:
    for rel in [*SOURCES, *SECRETS_INSIDE, *OUTSIDE, "jepa_ray/__pycache__/dicom.cpython-311.pyc"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(SOURCES.get(rel, "AKIA-not-for-upload\n"))
    (root / "jepa_ray" / "ingest" / "cohort.parquet").write_bytes(b"PAR1")
    (root / "jepa_ray" / "ingest" / "env.py").symlink_to(root / ".env")  # a link out of the folders
    (root / ".gitignore").write_text("!.env\n")  # cannot re-include anything
    return root


def _ray_packs(runtime_env: dict, scratch: Path) -> list[str]:
    """The files Ray's job client would zip and upload for this runtime_env (its own code path)."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    packed = []

    def upload_fn(working_dir, excludes, is_file=False):
        zip_path = scratch / f"pkg{len(list(scratch.glob('*.zip')))}.zip"  # Ray reuses an existing one
        create_package(working_dir, zip_path, include_gitignore=True, excludes=excludes)
        packed.extend(n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/"))

    upload_working_dir_if_needed(dict(runtime_env), include_gitignore=True, upload_fn=upload_fn)
    return sorted(packed)


def test_upload_is_the_allowlist_and_never_a_secret(tmp_path):
    root = fake_checkout(tmp_path / "checkout")
    spec = job_spec("prepare", ["--config", "my/exp.yaml", "--out", "/s"], root, env=["A=1"])
    assert sorted(spec.upload.files) == sorted(SOURCES)
    assert list(spec.upload.secrets) == sorted(SECRETS_INSIDE)
    assert spec.upload.left_out == ("jepa_ray/ingest/cohort.parquet", "jepa_ray/ingest/env.py")

    class Client:  # Ray's job client, less the HTTP: packs working_dir with Ray's packaging code
        def submit_job(self, entrypoint, runtime_env, submission_id, metadata):
            self.working_dir = Path(runtime_env["working_dir"])
            self.packed = _ray_packs(runtime_env, tmp_path)
            self.mode = self.working_dir.stat().st_mode & 0o777
            return submission_id

    jobs = Jobs.__new__(Jobs)
    jobs.url, jobs.client = "http://127.0.0.1:1", Client()
    assert jobs.submit(spec) == spec.submission_id
    assert jobs.client.packed == sorted(SOURCES)  # what Ray zips: the package, jobs, configs, pyproject
    assert jobs.client.mode == 0o700
    assert not jobs.client.working_dir.exists()  # the staged copy is gone once submitted
    # a checkout is never the working_dir itself: Ray would pack every secret in it
    assert set(_ray_packs({"working_dir": str(root)}, tmp_path)) >= {".env", "id_rsa", "runs/x.pt"}


def test_the_upload_summary_names_files_size_and_skipped_secrets(tmp_path):
    root = fake_checkout(tmp_path / "checkout")
    upload = plan_upload(root, "prepare", ["--config", "my/exp.yaml"])
    size = sum(len(text) for text in SOURCES.values())
    assert upload.total_bytes == size
    assert upload.summary() == (
        f"uploading {len(SOURCES)} files ({size / 1024:.1f} KiB) from {root} as the job's working_dir: "
        "README.md, constraints.txt, jepa_ray/ (3 files), jobs/ (4 files), my/ (1 file), pyproject.toml"
    )
    address = f"http://127.0.0.1:{_free_port()}"
    args = [
        "submit",
        "--working-dir",
        str(root),
        "--address",
        address,
        "--",
        "prepare",
        "--config",
        "my/exp.yaml",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no Ray job API answers" in result.output, result.output
    assert f"uploading {len(SOURCES)} files ({size / 1024:.1f} KiB)" in result.output
    warning = result.output.split("secret-looking file(s), never uploaded: ", 1)[1]
    assert all(rel in warning for rel in SECRETS_INSIDE)
    assert "jepa_ray/ingest/cohort.parquet" in result.output


def test_bench_uploads_the_benchmark_scripts_only():
    files = plan_upload(ROOT, "bench", ["train"]).files
    assert "benchmarks/bench_train.py" in files
    assert not [f for f in files if f.startswith("benchmarks/results")]
    assert not [f for f in plan_upload(ROOT, "pretrain", []).files if f.startswith("benchmarks/")]


def test_unsafe_or_oversized_uploads_are_refused_naming_the_input(tmp_path):
    root = fake_checkout(tmp_path / "checkout")
    (tmp_path / "elsewhere.yaml").write_text("{}\n")
    (root / "jobs" / "configs" / "linked.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    with pytest.raises(JobError, match=r"--config \.\./elsewhere\.yaml: outside the checkout"):
        job_spec("prepare", ["--config", "../elsewhere.yaml"], root)
    with pytest.raises(JobError, match=r"--config jobs/configs/linked\.yaml: outside the checkout"):
        job_spec("prepare", ["--config", "jobs/configs/linked.yaml"], root)
    with pytest.raises(JobError, match=r"--config jobs/configs/salt: its name looks like a credential"):
        job_spec("prepare", ["--config", "jobs/configs/salt"], root)
    with pytest.raises(JobError, match=f"--working-dir {tmp_path}: not a jepa-ray checkout"):
        plan_upload(tmp_path, "prepare", [])
    with (root / "jobs" / "configs" / "huge.yaml").open("wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: no disk used
    with pytest.raises(
        JobError,
        match=r"the upload would be 100\.0 MiB, over jepa-ray's limit of 100\.0 MiB .* the largest files: "
        r"jobs/configs/huge\.yaml \(100\.0 MiB\), ",
    ):
        job_spec("prepare", [], root)


# --- a token never crosses the network in clear text -------------------------------------------


@pytest.mark.parametrize(
    "url, token, insecure, refused",
    [
        ("http://10.0.0.5:8265", "RAY_AUTH_TOKEN", False, True),
        ("http://ray-head.internal:8265", "RAY_AUTH_TOKEN", False, True),
        ("http://127.0.0.1.example.org:8265", "RAY_AUTH_TOKEN", False, True),
        ("http://10.0.0.5:8265", "RAY_AUTH_TOKEN", True, False),
        ("http://10.0.0.5:8265", None, False, False),
        ("http://127.0.0.1:8265", "RAY_AUTH_TOKEN", False, False),
        ("http://127.8.9.1:8265", "RAY_AUTH_TOKEN", False, False),
        ("http://localhost:8265", "RAY_AUTH_TOKEN", False, False),
        ("http://[::1]:8265", "RAY_AUTH_TOKEN", False, False),
        ("https://ray.example.org", "RAY_AUTH_TOKEN", False, False),
    ],
)
def test_token_over_plain_http_only_to_this_machine(url, token, insecure, refused):
    if not refused:
        check_transport(url, token, insecure)
        return
    with pytest.raises(JobError) as e:
        check_transport(url, token, insecure)
    assert f"{url}: refusing to send the Ray token (from RAY_AUTH_TOKEN) over plain http" in str(e.value)
    for what in ("cross the network in clear text", "kubectl port-forward", "http://127.0.0.1:8265"):
        assert what in str(e.value)
    assert "https://" in str(e.value) and "--insecure-http" in str(e.value)


def test_loopback_is_decided_without_resolving_names():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert is_loopback("LOCALHOST")
    assert not is_loopback("10.0.0.5") and not is_loopback("localhost.example.org") and not is_loopback("")


def test_every_jobs_command_refuses_the_token_over_http_unless_insecure(monkeypatch):
    import jepa_ray.submit

    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-0123")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    remote = ["--address", "http://10.0.0.5:8265"]
    commands = [["jobs", "list"], ["jobs", "status", "x"], ["jobs", "logs", "x"], ["jobs", "stop", "x"]]
    submit = ["submit", *remote, "--", "prepare", "--out", "/s"]
    for args in [[*c, *remote] for c in commands] + [submit]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "would cross the network in clear text" in result.output, args

    def reached(url, headers=None, timeout=0):
        raise JobError(f"reached {url} with {sorted(headers)}")

    monkeypatch.setattr(jepa_ray.submit, "check_reachable", reached)
    for args in [[*c, *remote, "--insecure-http"] for c in commands] + [
        [*submit[:3], "--insecure-http", *submit[3:]]
    ]:
        result = CliRunner().invoke(app, args)
        assert "reached http://10.0.0.5:8265 with ['Authorization']" in result.output, (args, result.output)


# --- what is printed about a job --------------------------------------------------------------

ENTRYPOINT = (
    "python jobs/prepare.py --salt=s3cr3t-salt AWS_SECRET_ACCESS_KEY=wJalrXUt --password 'hunter 2' "
    "--out /s prepare.deid.salt_file=/etc/jepa/salt --api-key=k-42 https://bob:pw-9@example.org/x"
)
LEAKS = ("s3cr3t-salt", "wJalrXUt", "hunter", "k-42", "pw-9", "sk-live", "tok-1")


def _info(**kw):
    fields = {
        "status": "FAILED",
        "message": "Job failed: Bearer tok-1 refused",
        "entrypoint": ENTRYPOINT,
        "start_time": 1_700_000_000_000,
        "end_time": None,
        "runtime_env": {
            "working_dir": "gcs://_ray_pkg_0123.zip",
            "env_vars": {"PYTHONUNBUFFERED": "1", "OPENAI_KEY": "sk-live"},
            "pip": {"packages": ["numpy==2.1.3"]},
        },
        "metadata": {"command": "prepare", "api_token": "tok-1"},
        "submission_id": "jepa-ray-prepare-1",
        "job_id": None,
    }
    return SimpleNamespace(**{**fields, **kw})


def test_job_status_masks_environment_values_and_secret_arguments():
    lines = describe_job("jepa-ray-prepare-1", _info())
    text = "\n".join(lines)
    assert not [leak for leak in LEAKS if leak in text], text
    assert lines[0] == "jepa-ray-prepare-1: FAILED"
    assert "--salt=*** AWS_SECRET_ACCESS_KEY=*** --password *** --out /s" in text
    assert "prepare.deid.salt_file=/etc/jepa/salt" in text  # where the salt is, not the salt
    assert "https://bob:***@example.org/x" in text and "Bearer ***" in text
    assert '"env_vars": {"PYTHONUNBUFFERED": "***", "OPENAI_KEY": "***"}' in text
    assert '"working_dir": "gcs://_ray_pkg_0123.zip"' in text and '"numpy==2.1.3"' in text
    assert '"metadata": ' not in text and '  metadata: {"command": "prepare", "api_token": "***"}' in text
    assert redact({"RAY_AUTH_TOKEN_PATH": "/t", "password": "", "db_password": "x"}) == {
        "RAY_AUTH_TOKEN_PATH": "/t",
        "password": "",
        "db_password": "***",
    }
    assert redact_text("train.steps=3 --name a --token-file /t --secret --x") == (
        "train.steps=3 --name a --token-file /t --secret --x"
    )


def test_jobs_status_and_list_print_no_secret(monkeypatch):
    import jepa_ray.cli

    class FakeJobs:
        url = "http://127.0.0.1:8265"

        def info(self, job):
            return _info()

        def list(self):
            return [_info(), _info(submission_id="jepa-ray-prepare-2", entrypoint="python jobs/tune.py")]

    monkeypatch.setattr(jepa_ray.cli, "_jobs", lambda address, insecure_http=False: FakeJobs())
    status = CliRunner().invoke(app, ["jobs", "status", "jepa-ray-prepare-1"])
    assert status.exit_code == 1 and "jepa-ray-prepare-1: FAILED" in status.output
    assert "AWS_SECRET_ACCESS_KEY=***" in status.output and '"OPENAI_KEY": "***"' in status.output
    listed = CliRunner().invoke(app, ["jobs", "list"])
    assert listed.exit_code == 0 and "jepa-ray-prepare-2" in listed.output
    for output in (status.output, listed.output):
        assert not [leak for leak in LEAKS if leak in output], output
